"""GGUF export round trips: the written file loads back with transformers and as lmforge's base model, with
the HF model's logits (per-type tolerance), the same token ids and the same chat template text.

Tolerances, measured on these tiny random models (max |logit diff| / max |logit|): f32 0 (exact),
f16 3e-4, q8_0 6e-3; the tests allow about 5x that. Each load back parses the 49k-token vocabulary in
Python (~15-30 s here), so each case loads its file once."""

import pytest
import torch
from conftest import build_tiny_model

from lmforge.cli import main
from lmforge.data.templates import get_template

PROBE_TEXT = "Hello world! 你好，世界 🚀 code: x=1"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi! 你好"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
IDS = torch.arange(5, 40).view(1, -1)  # (1, T)


@torch.no_grad()
def logits(model):
    return model(input_ids=IDS).logits.double()  # (1, T, V)


def relative_diff(got, expected):
    return ((got - expected).abs().max() / expected.abs().max()).item()


def export_gguf(out, *options):
    assert main(["export", "--export_dir", str(out), "--export_format", "gguf", *options]) == 0
    (path,) = out.glob("*.gguf")
    return path


def load_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama_dir, tmp_path_factory):
    """A rank-2 LoRA adapter on q/k/v with non-zero lora_B, as training would leave it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                           LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj"]))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.1)
    out = tmp_path_factory.mktemp("adapter") / "lora"
    model.save_pretrained(out)
    return out


def test_base_plus_adapter_round_trips_as_lmforges_base_model(tiny_llama_dir, adapter_dir, smol_tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.model.loader import resolve_model_path

    path = export_gguf(tmp_path / "merged", "--adapter_name_or_path", str(adapter_dir), "--gguf_type", "f32",
                       "--template", "chatml")
    folder = resolve_model_path(str(path))  # what `model_name_or_path: merged-f32.gguf` loads
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    plain = logits(base)
    expected = logits(PeftModel.from_pretrained(base, adapter_dir))
    assert (logits(model) - expected).abs().max() <= 1e-5
    assert (expected - plain).abs().max() > 1e-2  # the adapter mattered, so the merge is in the file
    assert tokenizer(PROBE_TEXT)["input_ids"] == smol_tokenizer(PROBE_TEXT)["input_ids"]
    assert tokenizer.decode(tokenizer(PROBE_TEXT)["input_ids"]) == PROBE_TEXT
    trained = get_template("chatml", smol_tokenizer).render_prompt(MESSAGES[0]["content"], MESSAGES[1:])
    assert tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == trained
    assert main(["chat", "--model_name_or_path", str(path), "--query", "hi", "--max_new_tokens", "4"]) == 0


@pytest.mark.parametrize("gguf_type, tolerance", [("f16", 2e-3), ("q8_0", 3e-2)])
def test_logits_match_within_the_types_tolerance(tiny_llama_dir, tmp_path, gguf_type, tolerance):
    from transformers import AutoModelForCausalLM

    path = export_gguf(tmp_path / gguf_type, "--model_name_or_path", str(tiny_llama_dir), "--gguf_type", gguf_type)
    diff = relative_diff(logits(load_gguf(path)), logits(AutoModelForCausalLM.from_pretrained(tiny_llama_dir)))
    assert 0 < diff <= tolerance  # > 0: the weights really were stored in the smaller type


@pytest.mark.parametrize("arch, loads_as", [("qwen2", "Qwen2ForCausalLM"), ("qwen3", "Qwen3ForCausalLM"),
                                            ("mistral", "LlamaForCausalLM")])
def test_each_family_round_trips_exactly_in_f32(arch, loads_as, smol_tokenizer_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    source = build_tiny_model(smol_tokenizer_dir, tmp_path / arch, arch=arch)  # general.name is the folder's
    model = load_gguf(export_gguf(tmp_path / "out", "--model_name_or_path", str(source), "--gguf_type", "f32"))
    assert type(model).__name__ == loads_as  # llama.cpp runs Mistral as llama; the weights are the same
    assert (logits(model) - logits(AutoModelForCausalLM.from_pretrained(source))).abs().max() <= 1e-5
