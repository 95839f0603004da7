"""The export merge refuses an adapter whose weights did not really load into the base model."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge.errors import LmforgeError
from lmforge.export.merge import merge_adapters


@pytest.fixture()
def base(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir), AutoTokenizer.from_pretrained(tiny_llama_dir)


def save_adapter(model, out, trained: bool):
    """A rank-2 LoRA adapter on q_proj and v_proj; `trained` gives lora_B non-zero values, as training would."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    for name, p in peft_model.named_parameters():
        if trained and "lora_B" in name:
            p.data.normal_(std=0.1)
    peft_model.save_pretrained(out)
    peft_model.unload()  # the base model without the LoRA layers, for the merge under test
    return out


def test_an_adapter_whose_keys_match_no_parameter_is_refused(base, tmp_path):
    model, tokenizer = base
    adapter = save_adapter(model, tmp_path / "lora", trained=True)
    weights = load_file(adapter / "adapter_model.safetensors")
    renamed = {k.replace("self_attn", "attention"): v for k, v in weights.items()}  # another model's names
    save_file(renamed, adapter / "adapter_model.safetensors")
    with pytest.raises(LmforgeError, match=f"{adapter}: adapter weight .*attention.* matches no parameter"):
        merge_adapters(model.double(), tokenizer, [str(adapter)], 1e-6)


def test_an_adapter_whose_lora_b_are_all_zero_is_refused(base, tmp_path):
    model, tokenizer = base
    adapter = save_adapter(model, tmp_path / "lora", trained=False)
    with pytest.raises(LmforgeError, match="all lora_B are zero.*0 steps"):
        merge_adapters(model.double(), tokenizer, [str(adapter)], 1e-6)


def test_a_trained_adapter_merges(base, tmp_path):
    model, tokenizer = base
    adapter = save_adapter(model, tmp_path / "lora", trained=True)
    merged, diff = merge_adapters(model.double(), tokenizer, [str(adapter)], 1e-6)
    assert diff <= 1e-6
    assert not hasattr(merged, "peft_config")
