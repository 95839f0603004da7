"""FSDP2 (fully_shard) on 2 CPU processes with gloo, and `accelerate launch`, train to the weights of
one process with the same global batch."""

import json
import sys
from pathlib import Path

import pytest
from launch_helpers import free_port, max_diff, run, train_command, weights

pytestmark = pytest.mark.slow
FSDP = ["--fsdp", "true", "--fsdp_config", json.dumps({"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                                       "state_dict_type": "FULL_STATE_DICT"})]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_fsdp2_two_processes_equal_one_process(tiny_llama_dir, tmp_path, assert_moved, method):
    single = tmp_path / "single"
    run(train_command(tiny_llama_dir, single, method, "--per_device_train_batch_size", "4", "--val_size", "4"))
    out = tmp_path / "fsdp"
    proc = run(train_command(tiny_llama_dir, out, method, "--per_device_train_batch_size", "2", *FSDP, "--val_size", "4",
                             "--nproc_per_node", "2", "--master_port", str(free_port()), "--save_strategy", "steps",
                             "--save_steps", "2"))
    assert "engine: FSDP2 (" in proc.stderr
    sharded = proc.stderr.split("engine: FSDP2 (")[1].split(" parameter tensors sharded")[0].split("/")
    assert sharded[0] == sharded[1] and int(sharded[0]) > 0  # every parameter is a DTensor shard
    diff = max_diff(weights(single), weights(out))
    print(f"FSDP2 {method}: max |weight difference| 2x2 vs 1x4 = {diff:.2e}")
    assert diff <= 1e-5
    assert_moved(weights(out))
    assert (out / "checkpoint-2" / "lmforge_checkpoint.json").is_file()  # a checkpoint saved under FSDP
    results = {k: json.loads((d / "all_results.json").read_text())["eval_loss"] for k, d in (("1", single), ("2", out))}
    assert results["1"] == pytest.approx(results["2"], abs=1e-5)  # eval ran on both ranks without a hang


def test_accelerate_launch_runs_ddp(tiny_llama_dir, tmp_path, assert_moved):
    single = tmp_path / "single"
    run(train_command(tiny_llama_dir, single, "full", "--per_device_train_batch_size", "4"))
    out = tmp_path / "accelerate"
    cmd = train_command(tiny_llama_dir, out, "full", "--per_device_train_batch_size", "2")
    accelerate = str(Path(sys.executable).parent / "accelerate")
    proc = run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                "-m", *cmd[2:]])
    assert "engine: DDP on 2 processes (gloo)" in proc.stderr
    assert max_diff(weights(single), weights(out)) <= 1e-5
    assert_moved(weights(out))
