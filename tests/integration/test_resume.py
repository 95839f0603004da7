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
