"""Several processes on this CPU (gloo) train to the same weights as one process with the same
global batch: DDP through `nproc_per_node`, and two torchrun node groups on 127.0.0.1."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(model_dir, out, method, *extra):
    args = [sys.executable, "-m", "lmforge", "train", "--model_name_or_path", str(model_dir), "--dataset",
            "alpaca_demo", "--dataset_dir", str(ROOT / "data"), "--max_samples", "16", "--finetuning_type", method,
            "--max_steps", "3", "--optim", "sgd", "--learning_rate", "0.5", "--lr_scheduler_type", "constant",
            "--max_grad_norm", "0", "--train_sampling_strategy", "random", "--save_strategy", "no",
            "--logging_steps", "1", "--output_dir", str(out), *extra]
    return args + (["--lora_rank", "4"] if method == "lora" else [])


def weights(out):
    name = "adapter_model.safetensors" if (out / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(out / name)


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def run(cmd, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, **kwargs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("method", ["full", "lora"])
def test_ddp_two_processes_equal_one_process(tiny_llama_dir, tmp_path, method):
    single = tmp_path / "single"
    run(command(tiny_llama_dir, single, method, "--per_device_train_batch_size", "4"))
    ddp = tmp_path / "ddp"
    proc = run(command(tiny_llama_dir, ddp, method, "--per_device_train_batch_size", "2", "--nproc_per_node", "2",
                       "--master_port", str(free_port())))
    assert "launching torchrun --nproc_per_node=2" in proc.stderr
    diff = max_diff(weights(single), weights(ddp))
    print(f"{method}: max |weight difference| DDP 2x2 vs 1x4 = {diff:.2e}")
    assert diff <= 1e-5
    assert (ddp / "trainer_log.jsonl").read_text().count('"step": 1,') == 1  # only rank 0 logs


def test_two_node_groups_on_localhost_equal_one_process(tiny_llama_dir, tmp_path):
    single = tmp_path / "single"
    run(command(tiny_llama_dir, single, "full", "--per_device_train_batch_size", "4"))
    out, port = tmp_path / "nodes", str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(command(tiny_llama_dir, out, "full", "--per_device_train_batch_size", "2", "--nnodes", "2",
                                      "--node_rank", str(rank), "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
                                      "--master_port", port), env=env, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors[0][-2000:] + errors[1][-2000:]
    diff = max_diff(weights(single), weights(out))
    print(f"two nodes: max |weight difference| = {diff:.2e}")
    assert diff <= 1e-5
