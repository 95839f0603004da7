"""Run `lmforge train` in subprocesses (one or several ranks) and compare the weights they save."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(model_dir: Path, out: Path, method: str, *extra: str, optim: str = "sgd", lr: str = "0.5") -> list[str]:
    """3 optimizer steps on 16 alpaca rows, no clipping, constant lr: every difference shows in the weights."""
    args = [sys.executable, "-m", "lmforge", "train", "--model_name_or_path", str(model_dir), "--dataset",
            "alpaca_demo", "--dataset_dir", str(ROOT / "data"), "--max_samples", "16", "--finetuning_type", method,
            "--max_steps", "3", "--optim", optim, "--learning_rate", lr, "--lr_scheduler_type", "constant",
            "--max_grad_norm", "0", "--train_sampling_strategy", "random", "--save_strategy", "no",
            "--logging_steps", "1", "--output_dir", str(out), *extra]
    return args + (["--lora_rank", "4"] if method == "lora" else [])


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def distributed(cmd: list[str], processes: int = 2) -> list[str]:
    return cmd + ["--nproc_per_node", str(processes), "--master_port", str(free_port())]


def weights(out: Path) -> dict:
    name = "adapter_model.safetensors" if (out / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(out / name)


def max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b), set(a) ^ set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)
