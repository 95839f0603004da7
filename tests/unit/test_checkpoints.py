"""Checkpoint bookkeeping that needs no training: moving an overwritten run aside, unstaged paths."""

from pathlib import Path

from lmforge.train.checkpoints import checkpoints, move_previous_run, unstaged_path


def make_checkpoints(out: Path, *steps: int) -> None:
    for step in steps:
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")


def test_previous_run_is_moved_aside_under_a_name_rotation_never_matches(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    make_checkpoints(tmp_path, 3, 4)
    first = move_previous_run(tmp_path)
    make_checkpoints(tmp_path, 1)
    second = move_previous_run(tmp_path)  # the same second: a distinct folder, nothing merged or lost
    assert first != second and first.name.startswith("previous-run-")
    assert sorted(p.name for p in first.iterdir()) == ["checkpoint-3", "checkpoint-4"]
    assert [p.name for p in second.iterdir()] == ["checkpoint-1"]
    assert checkpoints(tmp_path) == []
    assert move_previous_run(tmp_path) is None  # nothing to move: no empty folder


def test_only_rank_zero_moves_the_previous_run(tmp_path, monkeypatch):
    make_checkpoints(tmp_path, 2)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")  # rank 0 of the second node is not the launch's rank 0
    assert move_previous_run(tmp_path) is None
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-2"]


def test_a_path_recorded_under_staging_points_at_the_renamed_folder(tmp_path):
    assert unstaged_path(str(tmp_path / ".staging" / "checkpoint-3"), tmp_path) == str(tmp_path / "checkpoint-3")
    assert unstaged_path(str(tmp_path / "checkpoint-2"), tmp_path) == str(tmp_path / "checkpoint-2")
    assert unstaged_path(None, tmp_path) is None
