"""kill -9 at arbitrary points, resume with the same command: the same weights, bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
STEPS = 12  # 12 rows, batch 2: 6 steps an epoch, 2 epochs


def command(model_dir, out):
    return [sys.executable, "-m", "lmforge", "train", "--model_name_or_path", str(model_dir), "--dataset",
            "alpaca_demo", "--dataset_dir", str(ROOT / "data"), "--max_samples", "12", "--finetuning_type", "full",
            "--per_device_train_batch_size", "2", "--num_train_epochs", "2", "--save_steps", "2",
            "--save_total_limit", "2", "--logging_steps", "1", "--learning_rate", "1e-3", "--seed", "3",
            "--output_dir", str(out)]


def step_losses(out):
    records = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


@pytest.fixture(scope="module")
def baseline(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "uninterrupted"
    subprocess.run(command(tiny_llama_dir, out), check=True, capture_output=True, timeout=300)
    return out


KILL_POINTS = {
    "early": lambda out: (out / "checkpoint-2").is_dir(),
    "mid-epoch": lambda out: (out / "checkpoint-4").is_dir(),
    "epoch-boundary": lambda out: (out / "checkpoint-6").is_dir(),
    "during-save": lambda out: (out / ".staging" / "checkpoint-8").is_dir(),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_then_resume_ends_bit_identical(tiny_llama_dir, baseline, tmp_path, point):
    out = tmp_path / "interrupted"
    proc = subprocess.Popen(command(tiny_llama_dir, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while proc.poll() is None and not KILL_POINTS[point](out) and time.time() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, "the run ended before the kill point"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "model.safetensors").exists()
    resumed = subprocess.run(command(tiny_llama_dir, out), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr
    a, b = load_file(baseline / "model.safetensors"), load_file(out / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert step_losses(out) == step_losses(baseline)  # every step once, same losses: no replay, no skip
    source = resumed.stderr.split("resuming from ")[1].split()[0]
    kept = {p.name for p in out.glob("checkpoint-*")}
    assert kept == {"checkpoint-10", "checkpoint-12", Path(source).name}  # save_total_limit 2 + the resume source
    assert not list((out / ".staging").glob("checkpoint-*"))


def test_sigterm_saves_a_checkpoint_and_the_same_command_finishes_the_run(tiny_llama_dir, baseline, tmp_path):
    out = tmp_path / "stopped"
    proc = subprocess.Popen(command(tiny_llama_dir, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while proc.poll() is None and not (out / "checkpoint-2").is_dir() and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM after step" in err and "run the same command again to resume" in err
    stopped_at = int(err.split("stopped by SIGTERM after step ")[1].split(";")[0])
    assert (out / f"checkpoint-{stopped_at}").is_dir() and stopped_at < STEPS
    subprocess.run(command(tiny_llama_dir, out), check=True, capture_output=True, timeout=300)
    a, b = load_file(baseline / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_damaged_newest_checkpoint_is_skipped_with_a_warning(tmp_path, caplog):
    from lmforge.train.checkpoints import newest_complete, write_manifest

    for step in (2, 4):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"x" * 100)
        write_manifest(folder, {"config": "cfg"}, step)
    (tmp_path / "checkpoint-4" / "model.safetensors").write_bytes(b"x" * 10)  # truncated
    with caplog.at_level("WARNING"):
        assert newest_complete(tmp_path) == tmp_path / "checkpoint-2"
    assert "checkpoint-4: model.safetensors has 10 bytes, expected 100" in caplog.text


def test_another_config_is_never_resumed_silently(tmp_path):
    from lmforge.errors import LmforgeError
    from lmforge.train.checkpoints import config_fingerprint, resolve_resume, write_manifest

    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    (folder / "trainer_state.json").write_text("{}")
    write_manifest(folder, {"config": config_fingerprint({"learning_rate": "1e-3"})}, 2)
    same = {"config": config_fingerprint({"learning_rate": "1e-3", "max_steps": 50})}  # max_steps may change
    assert resolve_resume(str(tmp_path), None, same, overwrite=False) == str(folder)
    other = {"config": config_fingerprint({"learning_rate": "1e-4"})}
    with pytest.raises(LmforgeError, match="holds checkpoints of a different configuration"):
        resolve_resume(str(tmp_path), None, other, overwrite=False)
    assert resolve_resume(str(tmp_path), "auto", other, overwrite=False) == str(folder)
    assert resolve_resume(str(tmp_path), None, other, overwrite=True) is None


def test_disk_full_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    import shutil as sh

    from lmforge.errors import LmforgeError
    from lmforge.train.checkpoints import ensure_disk_space

    monkeypatch.setattr(sh, "disk_usage", lambda p: sh._ntuple_diskusage(100, 99, 1))
    with pytest.raises(LmforgeError, match="not enough disk to save a checkpoint"):
        ensure_disk_space(tmp_path, 10_000)


def test_lora_with_gradient_accumulation_resumes_bit_identical(tiny_llama_dir, tmp_path):
    """Accumulation position and adapter optimizer state survive a SIGKILL too."""
    def lora(out):
        cmd = command(tiny_llama_dir, out)
        cmd[cmd.index("full")] = "lora"
        return cmd + ["--gradient_accumulation_steps", "2", "--per_device_train_batch_size", "1", "--lora_rank", "4"]

    base, out = tmp_path / "base", tmp_path / "killed"
    subprocess.run(lora(base), check=True, capture_output=True, timeout=300)
    proc = subprocess.Popen(lora(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not (out / "checkpoint-4").is_dir():
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run(lora(out), check=True, capture_output=True, timeout=300)
    a, b = load_file(base / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert step_losses(out) == step_losses(base)


def test_a_second_ctrl_c_stops_at_once(tiny_llama_dir, tmp_path):
    out = tmp_path / "interrupted"
    proc = subprocess.Popen(command(tiny_llama_dir, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not (tmp_path / "interrupted" / "trainer_log.jsonl").is_file():
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-2000:]
    assert "SIGINT: finishing this step" in err and "lmforge: interrupted" in err
    assert not (out / "model.safetensors").exists()


def run_in_process(model_dir, out, *args):
    from lmforge.cli import main

    return main(["train", "--model_name_or_path", str(model_dir), "--dataset", "alpaca_demo", "--dataset_dir",
                 str(ROOT / "data"), "--max_samples", "12", "--finetuning_type", "full",
                 "--per_device_train_batch_size", "2", "--logging_steps", "1", "--seed", "3", "--report_to", "none",
                 "--output_dir", str(out), *args])


def test_best_checkpoint_is_recorded_at_its_final_path_and_kept(tiny_llama_dir, tmp_path):
    """At this learning rate eval_loss rises after step 1, so the best checkpoint is the oldest one."""
    from lmforge.train.checkpoints import checkpoint_problem

    out = tmp_path / "best"
    code = run_in_process(tiny_llama_dir, out, "--max_steps", "3", "--learning_rate", "2e-1", "--val_size", "4",
                          "--eval_strategy", "steps", "--eval_steps", "1", "--save_steps", "1",
                          "--load_best_model_at_end", "true", "--metric_for_best_model", "eval_loss",
                          "--save_total_limit", "1")
    assert code == 0
    state = json.loads((out / "trainer_state.json").read_text())
    evals = {r["step"]: r["eval_loss"] for r in state["log_history"] if "eval_loss" in r}
    assert min(evals, key=evals.get) == 1 and evals[3] > evals[1]
    best = Path(state["best_model_checkpoint"])
    assert best == out / "checkpoint-1" and best.is_dir()  # not output_dir/.staging, and not rotated away
    saved = json.loads((best / "trainer_state.json").read_text())["best_model_checkpoint"]
    assert saved == str(best) and checkpoint_problem(best) is None  # the rewritten copy still matches its manifest
    a, b = load_file(best / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the best model was loaded at the end and saved


def test_overwrite_moves_the_old_runs_checkpoints_aside(tiny_llama_dir, tmp_path, caplog):
    out = tmp_path / "run"
    assert run_in_process(tiny_llama_dir, out, "--max_steps", "4", "--save_steps", "1") == 0
    with caplog.at_level("WARNING"):
        assert run_in_process(tiny_llama_dir, out, "--max_steps", "2", "--save_steps", "1", "--save_total_limit", "2",
                              "--overwrite_output_dir", "true") == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    for step in (1, 2):  # the new run's checkpoints, not rotated away in favour of the old run's 3 and 4
        assert json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())["max_steps"] == 2
    [moved] = out.glob("previous-run-*")
    assert sorted(p.name for p in moved.glob("checkpoint-*")) == [f"checkpoint-{s}" for s in (1, 2, 3, 4)]
    assert json.loads((moved / "checkpoint-4" / "trainer_state.json").read_text())["max_steps"] == 4
    assert moved.name in caplog.text
