"""A streamed run resumed from a checkpoint continues its stream where the trained batches ended: the same
weights and logs, bit for bit, across the stream's wrap into a new epoch, without re-reading the batches it
had trained; each process resumes its own shard."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from launch_helpers import distributed, run, weights
from safetensors.torch import load_file

from lmforge.cli import main
from lmforge.data.collator import PaddingCollator
from lmforge.train.checkpoints import MANIFEST, write_manifest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
TIMING = ("tokens_per_second", "elapsed_s")
# 12 alpaca rows, batch 2: the stream wraps after step 6 of 10
WRAPPING = ("--max_samples", "12", "--per_device_train_batch_size", "2")
# 11 rows, batch 1, accumulation 2: the 11th batch is accumulated into the first step of the second pass
LEFTOVER = ("--max_samples", "11", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2")


def stream_args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model_name_or_path", str(model_dir), "--dataset", "alpaca_demo", "--dataset_dir",
            str(ROOT / "data"), "--streaming", "true", "--finetuning_type", "full", "--max_steps", "10",
            "--save_steps", "2", "--logging_steps", "1", "--learning_rate", "1e-3", "--seed", "3",
            "--report_to", "none", "--output_dir", str(out), *extra]


def train(model_dir: Path, out: Path, *extra: str) -> None:
    assert main(stream_args(model_dir, out, *extra)) == 0


def logged_steps(out: Path) -> list[dict]:
    """Every step's log record without its timings: step, epoch, loss, grad_norm, lr, padding."""
    records = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records if "loss" in r]


def killed_after(run_dir: Path, step: int, out: Path) -> Path:
    """`out` as a run killed right after checkpoint-`step` leaves it: that checkpoint and the log so far."""
    out.mkdir(parents=True)
    shutil.copytree(run_dir / f"checkpoint-{step}", out / f"checkpoint-{step}")
    shutil.copy(run_dir / "trainer_log.jsonl", out / "trainer_log.jsonl")
    return out


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert logged_steps(a) == logged_steps(b)


@pytest.fixture(scope="module")
def dropout_model_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny model with attention dropout: training draws from the RNG, so a resume must restore it where
    the uninterrupted run had it (restarting a stream draws a loader seed)."""
    out = tmp_path_factory.mktemp("tiny-dropout")
    shutil.copytree(tiny_llama_dir, out, dirs_exist_ok=True)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.2}))
    return out


@pytest.fixture(scope="module")
def uninterrupted(dropout_model_dir, tmp_path_factory):
    runs = {}
    for name, extra in (("wrapping", WRAPPING), ("leftover", LEFTOVER)):
        runs[name] = tmp_path_factory.mktemp("stream") / name
        train(dropout_model_dir, runs[name], *extra)
    return runs


@pytest.mark.parametrize("layout, step, where", [
    ("wrapping", 6, {"epoch": 0, "batches_in_epoch": 6, "exhausted": True}),  # the pass just ended
    ("wrapping", 8, {"epoch": 1, "batches_in_epoch": 2, "exhausted": False}),  # after the wrap
    ("leftover", 4, {"epoch": 0, "batches_in_epoch": 8, "exhausted": False}),  # mid-pass
    ("leftover", 6, {"epoch": 1, "batches_in_epoch": 2, "exhausted": False}),  # a step spanning the wrap
])
def test_a_resumed_stream_ends_bit_identical(dropout_model_dir, uninterrupted, tmp_path, layout, step, where):
    run_dir = uninterrupted[layout]
    saved = json.loads((run_dir / f"checkpoint-{step}" / "stream_state_0.json").read_text())
    assert {k: saved[k] for k in where} == where
    out = killed_after(run_dir, step, tmp_path / "resumed")
    train(dropout_model_dir, out, *(WRAPPING if layout == "wrapping" else LEFTOVER))
    assert_same_run(run_dir, out)  # the logged epoch too: the resumed run counts from where the pass began
    assert int(logged_steps(out)[-1]["epoch"]) == 1  # it ended in the stream's second pass


def collated_batches(monkeypatch) -> list[int]:
    """Rows of every batch the data loader builds from now on."""
    sizes: list[int] = []
    collate = PaddingCollator.__call__

    def counting(self, features):
        sizes.append(len(features))
        return collate(self, features)

    monkeypatch.setattr(PaddingCollator, "__call__", counting)
    return sizes


def test_a_resume_reads_only_the_batches_it_trains(tiny_llama_dir, tmp_path, monkeypatch, caplog):
    """Re-reading and skipping the trained batches (as before) would build `step` more batches on resume;
    the stream continues instead, so the batches built beyond the trained ones stay 1 (the loader's look-ahead)
    whether the run resumes at step 2 or 8 (after the wrap)."""
    base = tmp_path / "base"
    train(tiny_llama_dir, base, *WRAPPING)
    built_beyond_trained = {}
    for step in (2, 8):
        sizes = collated_batches(monkeypatch)
        with caplog.at_level("INFO"):
            train(tiny_llama_dir, killed_after(base, step, tmp_path / f"resumed-{step}"), *WRAPPING)
        built_beyond_trained[step] = len(sizes) - (10 - step)
        assert_same_run(base, tmp_path / f"resumed-{step}")
    assert built_beyond_trained == {2: 1, 8: 1}
    assert "resuming the stream at epoch 1 after its batch 2 (nothing re-read)" in caplog.text


def test_an_older_streamed_checkpoint_resumes_by_skipping_with_a_warning(tiny_llama_dir, tmp_path, monkeypatch,
                                                                         caplog):
    base = tmp_path / "base"
    train(tiny_llama_dir, base, *WRAPPING, "--max_steps", "6", "--save_steps", "3")
    old = killed_after(base, 3, tmp_path / "old")
    folder = old / "checkpoint-3"
    (folder / "stream_state_0.json").unlink()  # as lmforge wrote checkpoints before it saved the position
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).unlink()
    write_manifest(folder, manifest["run"], 3)
    sizes = collated_batches(monkeypatch)
    with caplog.at_level("WARNING"):
        train(tiny_llama_dir, old, *WRAPPING, "--max_steps", "6", "--save_steps", "3")
    assert "holds no stream position" in caplog.text and "re-reading and skipping the 3 batches" in caplog.text
    assert len(sizes) == 6  # the 3 trained batches again, then the 3 left (the pass ends with the run)
    assert_same_run(base, old)  # before a wrap, skipping still resumes exactly


def test_a_run_that_does_not_stream_saves_no_stream_position(tiny_llama_dir, tmp_path):
    out = tmp_path / "cached"
    args = stream_args(tiny_llama_dir, out, *WRAPPING, "--max_steps", "2", "--save_steps", "1")
    args[args.index("--streaming") + 1] = "false"
    assert main(args) == 0
    assert (out / "checkpoint-2" / "rng_state.pth").is_file()
    assert not list(out.glob("checkpoint-*/stream_state_*"))


def two_files(tmp_path: Path, second: int) -> Path:
    """A dataset folder of two files (two stream shards): 6 alpaca rows and a row longer than cutoff_len (the
    stream drops it), then `second` other rows."""
    data = tmp_path / "two-files"
    data.mkdir()
    rows = json.loads((ROOT / "data" / "alpaca_demo.json").read_text())
    too_long = {"instruction": "word " * 3000, "input": "", "output": "x"}
    (data / "part0.json").write_text(json.dumps(rows[:3] + [too_long] + rows[3:6]))
    (data / "part1.json").write_text(json.dumps(rows[6:6 + second]))
    return data


def test_two_processes_each_resume_their_own_shard(tiny_llama_dir, tmp_path):
    """Two data files, one shard per process, 6 examples each (6 steps a pass); the first file also holds a
    row longer than cutoff_len, which the stream drops, so the two processes stand at different rows of their
    files. Each saves and restores its own position: the resumed run ends as the uninterrupted one did."""
    data = two_files(tmp_path, second=6)

    def command(out: Path) -> list[str]:
        args = stream_args(tiny_llama_dir, out, "--per_device_train_batch_size", "1", "--max_steps", "8",
                           "--save_steps", "7")
        args[args.index("--dataset") + 1] = str(data)
        return distributed([sys.executable, "-m", "lmforge", *args])

    base = tmp_path / "base"
    run(command(base))
    states = [json.loads((base / "checkpoint-7" / f"stream_state_{rank}.json").read_text()) for rank in (0, 1)]
    assert [s["epoch"] for s in states] == [1, 1] and states[0]["dataset"] != states[1]["dataset"]
    out = killed_after(base, 7, tmp_path / "resumed")
    proc = run(command(out))
    assert "resuming the stream at epoch 1 after its batch 1 (nothing re-read)" in proc.stderr
    a, b = weights(base), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert logged_steps(base) == logged_steps(out)


def test_a_stream_read_by_loader_workers_resumes_bit_identical(dropout_model_dir, tmp_path, caplog):
    """dataloader_num_workers 2: each worker reads one of two files (one row too long, dropped; the files of
    3 and 4 batches, so the turns go w0 w1 w0 w1 w0 w1 w1 and a pass is 7 steps). torchdata's
    StatefulDataLoader state, saved per checkpoint, restores each worker's position and whose turn is next:
    a resume at step 3 (worker 1's turn), 6 (only worker 1 left) and 9 (after the wrap) ends as the
    uninterrupted run did, with nothing re-read."""
    data = two_files(tmp_path, second=8)
    extra = ("--dataset", str(data), "--dataloader_num_workers", "2", "--per_device_train_batch_size", "2",
             "--save_steps", "1", "--max_steps", "10")
    base = tmp_path / "base"
    train(dropout_model_dir, base, *extra)
    saved = json.loads((base / "checkpoint-3" / "stream_state_0.json").read_text())
    assert saved["workers"] == 2 and "loader" in saved and (saved["epoch"], saved["batches_in_epoch"]) == (0, 3)
    assert json.loads((base / "checkpoint-7" / "stream_state_0.json").read_text())["exhausted"] is True
    for step, epoch, batch in ((3, 0, 3), (6, 0, 6), (9, 1, 2)):
        out = killed_after(base, step, tmp_path / f"resumed-{step}")
        with caplog.at_level("INFO"):
            train(dropout_model_dir, out, *extra)
        assert f"resuming the stream at epoch {epoch} after its batch {batch} (nothing re-read)" in caplog.text
        assert_same_run(base, out)


def test_a_worker_count_change_resumes_by_skipping_with_a_warning(tiny_llama_dir, tmp_path, caplog):
    base = tmp_path / "base"
    train(tiny_llama_dir, base, *WRAPPING, "--max_steps", "4", "--dataloader_num_workers", "1")
    out = killed_after(base, 2, tmp_path / "resumed")
    with caplog.at_level("WARNING"):
        train(tiny_llama_dir, out, *WRAPPING, "--max_steps", "4")
    assert "holds the stream position of 1 loader workers, and dataloader_num_workers is 0" in caplog.text
    assert_same_run(base, out)  # before a wrap, skipping resumes exactly
