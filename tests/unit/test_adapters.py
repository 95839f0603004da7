"""Which parameters learn: after a real optimizer step, only those changed; the rest bit-identical."""

import pytest
import torch

from lmforge.config import FinetuningArguments, ModelArguments
from lmforge.errors import LmforgeError
from lmforge.model.adapters import linear_module_names, setup_finetuning
from lmforge.model.loader import count_parameters


def load(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)


def step_and_diff(model):
    """One AdamW step on a fixed batch; names of parameters whose values changed."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.arange(2, 34).view(2, 16)  # (B, T)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


def test_lora_trains_only_adapter_weights(tiny_llama_dir):
    model = setup_finetuning(load(tiny_llama_dir), FinetuningArguments(finetuning_type="lora", lora_rank=4), ModelArguments())
    changed = step_and_diff(model)
    assert changed and all("lora_" in n for n in changed)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == changed
    targets = set(model.peft_config["default"].target_modules)
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    total, trainable = count_parameters(model)
    # 2 layers x 7 projections, each rank 4 x (in + out)
    assert trainable == 2 * 4 * ((32 + 32) + (32 + 16) + (32 + 16) + (32 + 32) + 2 * (32 + 64) + (64 + 32))


def test_dora_and_rslora_reach_peft(tiny_llama_dir):
    args = FinetuningArguments(finetuning_type="lora", lora_rank=4, lora_alpha=8, use_dora=True, use_rslora=True,
                               lora_target="q_proj,v_proj")
    model = setup_finetuning(load(tiny_llama_dir), args, ModelArguments())
    config = model.peft_config["default"]
    assert config.use_dora and config.use_rslora and set(config.target_modules) == {"q_proj", "v_proj"}
    assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters())
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / 4 ** 0.5)


@pytest.mark.parametrize("layers, modules, expected", [
    (1, "all", {"model.layers.1."}),
    (-1, "all", {"model.layers.0."}),
    (2, "mlp", {"model.layers.0.mlp.", "model.layers.1.mlp."}),
])
def test_freeze_trains_only_the_chosen_blocks(tiny_llama_dir, layers, modules, expected):
    args = FinetuningArguments(finetuning_type="freeze", freeze_trainable_layers=layers, freeze_trainable_modules=modules)
    model = setup_finetuning(load(tiny_llama_dir), args, ModelArguments())
    changed = step_and_diff(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable
    assert all(n.startswith(tuple(expected)) for n in changed)
    assert all(any(n.startswith(e) for n in changed) for e in expected)


def test_freeze_extra_modules_and_bad_names(tiny_llama_dir):
    args = FinetuningArguments(finetuning_type="freeze", freeze_trainable_layers=1, freeze_extra_modules="norm")
    model = setup_finetuning(load(tiny_llama_dir), args, ModelArguments())
    assert "model.norm.weight" in {n for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(LmforgeError, match="freeze_trainable_modules: \\['attn'\\] not in a block; available:"):
        setup_finetuning(load(tiny_llama_dir), FinetuningArguments(finetuning_type="freeze", freeze_trainable_modules="attn"),
                         ModelArguments())
    with pytest.raises(LmforgeError, match="lora_target: \\['qkv'\\] are not linear layers"):
        setup_finetuning(load(tiny_llama_dir), FinetuningArguments(lora_target="qkv"), ModelArguments())


def test_full_trains_everything(tiny_llama_dir):
    model = setup_finetuning(load(tiny_llama_dir), FinetuningArguments(finetuning_type="full"), ModelArguments())
    assert step_and_diff(model) == {n for n, _ in model.named_parameters()}
    assert "lm_head" not in linear_module_names(model)


def test_inference_goes_to_the_gpu_when_there_is_one(monkeypatch):
    from lmforge.model.adapters import inference_placement

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert inference_placement("auto") == inference_placement("cuda") == {"device_map": "auto"}
    assert inference_placement("cpu") == {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert inference_placement("auto") == {}
    with pytest.raises(LmforgeError, match="device cuda: no CUDA GPU is visible"):
        inference_placement("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_chat_loads_the_model_onto_the_gpu_in_the_requested_dtype(tiny_llama_dir):
    from lmforge.serve.chat import load_for_inference

    _, model = load_for_inference(ModelArguments(model_name_or_path=str(tiny_llama_dir)), "auto", "bfloat16")
    assert model.device.type == "cuda" and model.dtype == torch.bfloat16
    _, model = load_for_inference(ModelArguments(model_name_or_path=str(tiny_llama_dir)), "cpu")
    assert model.device.type == "cpu"
