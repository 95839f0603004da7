"""DeepSpeed ZeRO-2/3 (and optimizer offload) on 2 CPU processes train to the weights of one process
with the same global batch. DeepSpeed runs here through its CPU accelerator and gloo."""

import sys
from pathlib import Path

import pytest
from launch_helpers import ROOT, distributed, free_port, max_diff, run, train_command, weights

pytestmark = pytest.mark.slow
DS = ROOT / "examples" / "deepspeed"


@pytest.fixture(scope="module")
def single(tiny_llama_dir, tmp_path_factory):
    """The one-process, batch-4 run for (method, optim), trained once per module."""
    done = {}

    def get(method: str, optim: str = "sgd", lr: str = "0.5") -> dict:
        if (method, optim) not in done:
            out = tmp_path_factory.mktemp(f"single-{method}-{optim}")
            run(train_command(tiny_llama_dir, out, method, "--per_device_train_batch_size", "4", optim=optim, lr=lr))
            done[method, optim] = weights(out)
        return done[method, optim]

    return get


@pytest.mark.parametrize("config, method", [("ds_z2_config.json", "full"), ("ds_z3_config.json", "full"),
                                            ("ds_z3_config.json", "lora")])
def test_zero_two_processes_equal_one_process(tiny_llama_dir, tmp_path, single, assert_moved, config, method):
    out = tmp_path / "ds"
    proc = run(distributed(train_command(tiny_llama_dir, out, method, "--per_device_train_batch_size", "2",
                                         "--deepspeed", str(DS / config))))
    stage = config[4]
    assert f"engine: DeepSpeed ZeRO-{stage} on 2 processes (gloo)" in proc.stderr
    diff = max_diff(single(method), weights(out))  # also: the tied lm_head is not saved twice
    print(f"ZeRO-{stage} {method}: max |weight difference| 2x2 vs 1x4 = {diff:.2e}")
    assert diff <= 1e-5
    assert_moved(weights(out))


def test_zero2_optimizer_offload_equals_one_process_adamw(tiny_llama_dir, tmp_path, single, assert_moved):
    out = tmp_path / "offload"
    proc = run(distributed(train_command(tiny_llama_dir, out, "full", "--per_device_train_batch_size", "2",
                                         "--deepspeed", str(DS / "ds_z2_offload_config.json"),
                                         optim="adamw_torch", lr="1e-3")))
    assert "engine: DeepSpeed ZeRO-2 (offload optimizer) on 2 processes" in proc.stderr
    diff = max_diff(single("full", "adamw_torch", "1e-3"), weights(out))
    print(f"ZeRO-2 offload: max |weight difference| = {diff:.2e}")
    assert diff <= 1e-5
    assert_moved(weights(out))


def test_deepspeed_launcher_runs_lmforge_as_a_module(tiny_llama_dir, tmp_path, single, assert_moved):
    """`deepspeed --module lmforge train ...` (its launcher adds --local_rank=N, which lmforge ignores)."""
    out = tmp_path / "launcher"
    cmd = train_command(tiny_llama_dir, out, "full", "--per_device_train_batch_size", "2",
                        "--deepspeed", str(DS / "ds_z2_config.json"))
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    run([deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), "--module", *cmd[2:]])
    assert max_diff(single("full"), weights(out)) <= 1e-5
    assert_moved(weights(out))


def test_offload_with_a_non_adam_optimizer_is_refused(tiny_llama_dir, tmp_path, capsys):
    from lmforge.cli import main

    args = train_command(tiny_llama_dir, tmp_path / "x", "full", "--deepspeed", str(DS / "ds_z2_offload_config.json"))
    assert main(args[3:]) == 2
    err = capsys.readouterr().err
    assert "offloads the optimizer" in err and "set optim: adamw_torch (not sgd)" in err
