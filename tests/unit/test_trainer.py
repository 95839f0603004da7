"""EngineMixin: DDP options set before the accelerator is built, fp16 overflow left to the loss scaler."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.train.trainer import NonFiniteGuard


def fake_trainer(scaler: object | None, grad: float) -> SimpleNamespace:
    weight = torch.nn.Parameter(torch.ones(3))
    weight.grad = torch.tensor([1.0, grad, 1.0])
    model = torch.nn.Module()
    model.w = weight
    accelerator = SimpleNamespace(scaler=scaler, optimizer_step_was_skipped=grad != 1.0)
    return SimpleNamespace(model=model, accelerator=accelerator, nan_policy="stop")


STATE = SimpleNamespace(global_step=4)
ARGS = SimpleNamespace(device=torch.device("cpu"))


def test_fp16_overflow_is_left_to_the_scaler_and_counted():
    trainer = fake_trainer(scaler=object(), grad=float("inf"))
    guard = NonFiniteGuard(trainer)
    guard.record_loss(torch.tensor(2.0))
    guard.on_pre_optimizer_step(ARGS, STATE, None)  # no stop: the scaler skips this step itself
    assert trainer.model.w.grad is not None
    guard.on_optimizer_step(ARGS, STATE, None)
    assert guard.overflows == 1


def test_without_a_scaler_inf_gradients_stop():
    guard = NonFiniteGuard(fake_trainer(scaler=None, grad=float("inf")))
    with pytest.raises(LmforgeError, match="non-finite gradients at optimizer step 5"):
        guard.on_pre_optimizer_step(ARGS, STATE, None)


def test_a_non_finite_loss_stops_even_under_fp16():
    guard = NonFiniteGuard(fake_trainer(scaler=object(), grad=1.0))
    guard.record_loss(torch.tensor(1.0))
    guard.record_loss(torch.tensor(float("nan")))
    with pytest.raises(LmforgeError, match="non-finite loss at optimizer step 5, micro-batch 2"):
        guard.on_pre_optimizer_step(ARGS, STATE, None)


def test_skip_drops_every_gradient():
    trainer = fake_trainer(scaler=None, grad=float("nan"))
    trainer.nan_policy = "skip"
    guard = NonFiniteGuard(trainer)
    guard.on_pre_optimizer_step(ARGS, STATE, None)
    assert trainer.model.w.grad is None and guard.skipped == 1


def test_ddp_find_unused_parameters_reaches_the_accelerator(tiny_llama_dir, tmp_path):
    """Set before Trainer.__init__ builds DDP's options; a peft model would otherwise get True."""
    from transformers import AutoModelForCausalLM

    from lmforge.config import TrainingArguments
    from lmforge.data.collator import PaddingCollator
    from lmforge.train.trainer import LmforgeTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    trainer = LmforgeTrainer(model=model, args=args, data_collator=PaddingCollator(0))
    assert trainer.accelerator.ddp_handler.find_unused_parameters is False


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None])
def test_gradient_check_finds_one_bad_value_among_many_tensors_of_mixed_dtypes(bad):
    guard = NonFiniteGuard(fake_trainer(scaler=None, grad=1.0))
    grads = [torch.full((5,), 6e4, dtype=torch.float16), torch.ones(3, dtype=torch.bfloat16)] + \
        [torch.randn(4, 4) for _ in range(20)]  # 6e4 is finite in fp16, though its L2 norm over 5 values is not
    if bad is not None:
        grads[13][2, 1] = bad
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g
        params.append(p)
    assert bool(guard._gradients_bad(params)) is (bad is not None)
