"""Several processes on this CPU (gloo) train to the same weights as one process with the same
global batch: DDP through `nproc_per_node`, and two torchrun node groups on 127.0.0.1."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from launch_helpers import distributed, free_port, max_diff, run, train_command, weights

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("method", ["full", "lora"])
def test_ddp_two_processes_equal_one_process(tiny_llama_dir, tmp_path, assert_moved, method):
    single = tmp_path / "single"
    run(train_command(tiny_llama_dir, single, method, "--per_device_train_batch_size", "4"))
    ddp = tmp_path / "ddp"
    proc = run(distributed(train_command(tiny_llama_dir, ddp, method, "--per_device_train_batch_size", "2")))
    assert "launching torchrun --nproc_per_node=2" in proc.stderr
    assert "engine: DDP on 2 processes (gloo)" in proc.stderr
    diff = max_diff(weights(single), weights(ddp))
    print(f"{method}: max |weight difference| DDP 2x2 vs 1x4 = {diff:.2e}")
    assert diff <= 1e-5
    assert_moved(weights(ddp))
    assert (ddp / "trainer_log.jsonl").read_text().count('"step": 1,') == 1  # only rank 0 logs


def test_two_node_groups_on_localhost_equal_one_process(tiny_llama_dir, tmp_path, assert_moved):
    single = tmp_path / "single"
    run(train_command(tiny_llama_dir, single, "full", "--per_device_train_batch_size", "4"))
    out, port = tmp_path / "nodes", str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(train_command(tiny_llama_dir, out, "full", "--per_device_train_batch_size", "2",
                                            "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1",
                                            "--master_addr", "127.0.0.1", "--master_port", port),
                              env=env, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors[0][-2000:] + errors[1][-2000:]
    diff = max_diff(weights(single), weights(out))
    print(f"two nodes: max |weight difference| = {diff:.2e}")
    assert diff <= 1e-5
    assert_moved(weights(out))


def test_streaming_with_two_processes_trains(tiny_llama_dir, tmp_path):
    """Streaming on several processes crashed before the first step: the columns of a stream were not always
    known on rank 1, and accelerate's rank-0 dispatch cannot concatenate batches padded to different lengths
    (nor lmforge's integer counts); each process now reads its own share of the stream."""
    out = tmp_path / "stream"
    cmd = train_command(tiny_llama_dir, out, "lora", "--streaming", "true", "--per_device_train_batch_size", "2")
    cmd.remove("--train_sampling_strategy")
    cmd.remove("random")
    proc = run(distributed(cmd))
    steps = [line for line in (out / "trainer_log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps) == 3 and all('"tokens_per_second"' in line for line in steps), proc.stderr[-2000:]


def test_save_on_each_node_renames_each_nodes_checkpoint_without_a_shared_file_system(tiny_llama_dir, tmp_path):
    """Two node groups, each writing to its own folder as nodes without a shared file system would: each node's
    local rank 0 turns its staged checkpoint into checkpoint-N (before, only global rank 0 renamed, so the second
    node's copy stayed in .staging and could never be resumed from)."""
    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outs = [tmp_path / f"node{rank}" for rank in (0, 1)]
    procs = [subprocess.Popen(train_command(tiny_llama_dir, outs[rank], "lora", "--per_device_train_batch_size", "2",
                                            "--save_strategy", "steps", "--save_steps", "2", "--save_on_each_node",
                                            "true", "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1",
                                            "--master_addr", "127.0.0.1", "--master_port", port),
                              env=env, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors[0][-2000:] + errors[1][-2000:]
    for out in outs:
        assert (out / "checkpoint-2" / "lmforge_checkpoint.json").is_file(), sorted(p.name for p in out.rglob("*"))
        assert not list((out / ".staging").glob("checkpoint-*"))
    assert max_diff(weights(outs[0]), weights(outs[1])) == 0.0


@pytest.mark.parametrize("poisoned_rank", [0, 1])
def test_nan_policy_skip_on_two_processes_skips_the_step_on_both(tiny_llama_dir, tmp_path, poisoned_rank):
    """One rank's loss is NaN at step 2: both ranks skip that update together (no hang, the same weights), and
    the run goes on."""
    out = tmp_path / "skip"
    cmd = train_command(tiny_llama_dir, out, "lora", "--per_device_train_batch_size", "2", "--save_strategy", "steps",
                        "--save_steps", "1", "--nan_policy", "skip")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port()), str(Path(__file__).with_name("poisoned_train.py"))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "POISON_STEP": "2", "POISON_RANK": str(poisoned_rank)}
    proc = subprocess.run(launcher + cmd[cmd.index("train"):], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "update skipped on every process" in proc.stderr
    ckpts = [weights(out / f"checkpoint-{n}") for n in (1, 2, 3)]
    assert max_diff(ckpts[0], ckpts[1]) == 0.0  # step 2 was skipped
    assert max_diff(ckpts[1], ckpts[2]) > 0  # step 3 trained again
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [r.get("skipped_steps", 0) for r in log if "loss" in r] == [0, 1, 1]
