"""The guarantees of EngineMixin hold for every stage, TRL-based or not: nan_policy (stop names the step; skip
leaves the weights of the poisoned step unchanged), tokens/s and padding in the log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.cli import main
from lmforge.train import trainer as trainer_module

ROOT = Path(__file__).resolve().parents[2]
# stage -> the options that make its run small (grpo: few short samples, a reward that always varies)
STAGE_ARGS = {
    "sft": ["--dataset", "alpaca_demo"],
    "pt": ["--dataset", "finance_corpus", "--cutoff_len", "64"],
    "rm": ["--dataset", "dpo_demo"],
    "dpo": ["--dataset", "dpo_demo"],
    "kto": ["--dataset", "kto_demo"],
    "grpo": ["--dataset", "rl_demo", "--reward_funcs", "length", "--num_generations", "2", "--max_new_tokens", "4",
             "--per_device_train_batch_size", "2"],
}


def poison_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Every loss of optimizer step `step` becomes NaN (after the model computed it, so backward spreads it),
    in the loss every trainer's mixin calls and in the pt/sft trainer's chunked loss."""
    for cls in (trainer_module.EngineMixin, trainer_module.LmforgeTrainer):
        monkeypatch.setattr(cls, "_model_loss", _poisoned(cls.__dict__["_model_loss"], step))


def _poisoned(original, step: int):
    def model_loss(self, model, inputs, *args, **kwargs):
        result = original(self, model, inputs, *args, **kwargs)
        if model.training and self.state.global_step + 1 == step:
            return result * float("nan") if isinstance(result, torch.Tensor) else (result[0] * float("nan"), *result[1:])
        return result

    return model_loss


def run(tmp_path: Path, stage: str, *extra: str) -> tuple[int, Path]:
    out = tmp_path / stage
    code = main(["train", "--stage", stage, "--model_name_or_path", str(TINY[0]), "--dataset_dir", str(ROOT / "data"),
                 "--output_dir", str(out), "--logging_steps", "1", "--report_to", "none", "--lora_rank", "4",
                 "--learning_rate", "1e-2", *STAGE_ARGS[stage], *extra])
    return code, out


TINY: list[Path] = []


@pytest.fixture(autouse=True)
def _tiny(tiny_llama_dir: Path) -> None:
    TINY[:] = [tiny_llama_dir]


@pytest.mark.parametrize("stage", list(STAGE_ARGS))
def test_nan_policy_stop_names_the_step_for_every_stage(tmp_path, monkeypatch, capsys, stage):
    poison_step(monkeypatch, 2)
    code, out = run(tmp_path, stage, "--max_steps", "3", "--save_strategy", "no", "--nan_policy", "stop")
    assert code == 2
    err = capsys.readouterr().err
    assert "at optimizer step 2" in err and "stopped before the update" in err, err
    assert not (out / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "kto"])
def test_nan_policy_skip_leaves_the_poisoned_step_unchanged(tmp_path, monkeypatch, stage):
    poison_step(monkeypatch, 2)
    code, out = run(tmp_path, stage, "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1",
                    "--nan_policy", "skip", "--lr_scheduler_type", "constant")
    assert code == 0
    weights = [load_file(out / f"checkpoint-{n}" / "adapter_model.safetensors") for n in (1, 2, 3)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # step 2 was skipped
    assert any(not torch.equal(weights[1][k], weights[2][k]) for k in weights[0])  # step 3 trained again
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [r.get("skipped_steps", 0) for r in log if "loss" in r] == [0, 1, 1]


@pytest.mark.parametrize("stage", ["rm", "dpo", "kto", "grpo"])
def test_trl_stages_log_tokens_per_second_and_padding(tmp_path, stage):
    code, out = run(tmp_path, stage, "--max_steps", "2", "--save_strategy", "no")
    assert code == 0
    steps = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps) == 2
    assert all(r["tokens_per_second"] > 0 and 0 <= r["padding_fraction"] < 1 for r in steps), steps
