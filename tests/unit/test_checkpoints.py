"""Checkpoint bookkeeping that needs no training: moving an overwritten run aside, unstaged paths, and what a\nresume compares with the checkpoint's run."""

import json
import os
from pathlib import Path

import pytest

from lmforge.errors import LmforgeError
from lmforge.train.checkpoints import (
    MANIFEST,
    checkpoints,
    move_previous_run,
    resolve_resume,
    run_fingerprint,
    unstaged_path,
    write_manifest,
)


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


def fake_checkpoint(out: Path, fingerprint: dict, step: int = 2) -> Path:
    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text("{}")
    write_manifest(folder, fingerprint, step)
    return folder


def fingerprint_of(tmp_path: Path, world_size: int = 1, deepspeed: str | None = None) -> dict:
    return run_fingerprint({"learning_rate": "1e-3"}, [tmp_path / "a.jsonl"], deepspeed, world_size)


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "a.jsonl"
    path.write_text('{"instruction": "q", "output": "a"}\n')
    return path


def test_a_resume_with_changed_data_is_refused_naming_the_file(tmp_path, data_file):
    folder = fake_checkpoint(tmp_path / "out", fingerprint_of(tmp_path))
    stat = data_file.stat()
    data_file.write_text('{"instruction": "Q", "output": "a"}\n')  # same size and mtime, other content
    os.utime(data_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    now = fingerprint_of(tmp_path)
    for requested in (None, "auto", str(folder)):
        with pytest.raises(LmforgeError, match=f"data file {data_file.resolve()} changed.*resume_on_changed_data"):
            resolve_resume(str(tmp_path / "out"), requested, now, overwrite=False)
    assert resolve_resume(str(tmp_path / "out"), None, now, overwrite=False, allow_changes=True) == str(folder)


def test_a_resume_with_another_process_count_names_both_counts(tmp_path, data_file):
    fake_checkpoint(tmp_path / "out", fingerprint_of(tmp_path, world_size=2))
    with pytest.raises(LmforgeError, match=r"written by 2 process\(es\), this run has 1"):
        resolve_resume(str(tmp_path / "out"), None, fingerprint_of(tmp_path, world_size=1), overwrite=False)


def test_a_resume_with_another_deepspeed_config_or_version_is_refused(tmp_path, data_file, monkeypatch):
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 2}}')
    fake_checkpoint(tmp_path / "out", fingerprint_of(tmp_path, deepspeed=str(ds)))
    ds.write_text('{"zero_optimization": {"stage": 3}}')
    with pytest.raises(LmforgeError, match="the deepspeed config's content changed"):
        resolve_resume(str(tmp_path / "out"), None, fingerprint_of(tmp_path, deepspeed=str(ds)), overwrite=False)
    ds.write_text('{"zero_optimization": {"stage": 2}}')
    newer = {**fingerprint_of(tmp_path, deepspeed=str(ds)), "lmforge": "9.9.9"}
    with pytest.raises(LmforgeError, match="written by lmforge .*, this is 9.9.9"):
        resolve_resume(str(tmp_path / "out"), None, newer, overwrite=False)


def test_an_unchanged_run_and_an_older_manifest_resume(tmp_path, data_file):
    folder = fake_checkpoint(tmp_path / "out", fingerprint_of(tmp_path))
    assert resolve_resume(str(tmp_path / "out"), None, fingerprint_of(tmp_path), overwrite=False) == str(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    del manifest["run"]  # written before lmforge recorded the run's data: only the options are compared
    (folder / MANIFEST).write_text(json.dumps(manifest))
    assert resolve_resume(str(tmp_path / "out"), None, fingerprint_of(tmp_path, world_size=4), overwrite=False)
