"""`lmforge train` started as a command re-executes itself with tcmalloc preloaded on CPU, and really runs with it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge import allocator

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(allocator.find_library("tcmalloc") is None, reason="libtcmalloc-minimal4 is not installed")
def test_lmforge_train_started_as_a_command_runs_with_tcmalloc(tiny_llama_dir, tmp_path):
    args = ["--model_name_or_path", str(tiny_llama_dir), "--dataset", "alpaca_demo", "--dataset_dir",
            str(ROOT / "data"), "--finetuning_type", "lora", "--max_steps", "1", "--cutoff_len", "64",
            "--report_to", "none", "--save_strategy", "no", "--output_dir"]
    env = {k: v for k, v in os.environ.items() if k not in (allocator.MARKER, "LD_PRELOAD")}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "lmforge", "train", *args, str(tmp_path / "a")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "host memory: tcmalloc (" in done.stderr  # printed only when the library is mapped in the process
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    system = subprocess.run([sys.executable, "-m", "lmforge", "train", *args, str(tmp_path / "b"),
                             "--host_allocator", "system"], env=env, capture_output=True, text=True, timeout=600)
    assert system.returncode == 0, system.stderr[-2000:]
    assert "host memory:" not in system.stderr
