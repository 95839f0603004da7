"""The lean SwiGLU gives the same loss and gradients as the model's own MLP and keeps less for the backward."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from lmforge.model.lean_ops import SiluMul, apply_lean_swiglu

SIZES = dict(vocab_size=300, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


def tiny(arch: str, act: str = "silu") -> torch.nn.Module:
    torch.manual_seed(0)
    config = (LlamaConfig if arch == "llama" else Qwen2Config)(**SIZES, hidden_act=act)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float()


def saved_bytes(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """Loss, and bytes of distinct non-parameter storages autograd keeps for the backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    return loss, sum(seen.values())


def test_silu_mul_gradients_equal_autograd():
    torch.manual_seed(0)
    gate, up = torch.randn(5, 7, dtype=torch.float64, requires_grad=True), torch.randn(5, 7, dtype=torch.float64,
                                                                                      requires_grad=True)
    assert torch.autograd.gradcheck(SiluMul.apply, (gate, up))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lean_mlp_same_loss_and_gradients_less_saved(arch):
    batch = {"input_ids": torch.randint(0, 300, (2, 24)), "labels": torch.randint(0, 300, (2, 24))}
    plain, lean = tiny(arch), tiny(arch)
    assert apply_lean_swiglu(lean) == 2
    ref_loss, ref_bytes = saved_bytes(plain, batch)
    loss, lean_bytes = saved_bytes(lean, batch)
    ref_loss.backward()
    loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-6)
    grads = dict(plain.named_parameters())
    for name, param in lean.named_parameters():
        assert (param.grad - grads[name].grad).abs().max().item() <= 1e-6, name
    # silu(gate) is no longer kept: one [tokens, intermediate] float32 tensor per layer
    assert ref_bytes - lean_bytes == 2 * (2 * 24 * 80 * 4)


def test_lean_mlp_under_lora_trains_the_same_adapters():
    from peft import LoraConfig, get_peft_model

    batch = {"input_ids": torch.randint(0, 300, (2, 16)), "labels": torch.randint(0, 300, (2, 16))}
    models = []
    for lean in (False, True):
        model = tiny("llama")
        if lean:
            apply_lean_swiglu(model)
        torch.manual_seed(1)
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        model(**batch).loss.backward()
        models.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert len(models[0]) == 2 * 7 * 2
    assert all((models[0][n] - models[1][n]).abs().max().item() <= 1e-6 for n in models[0])


def test_other_activations_are_left_alone():
    assert apply_lean_swiglu(tiny("llama", act="gelu")) == 0
    model = tiny("llama")
    assert apply_lean_swiglu(model) == 2 and apply_lean_swiglu(model) == 0  # once only
