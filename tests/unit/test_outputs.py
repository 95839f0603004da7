"""The model card's load snippet names local paths that load offline, whatever form the base was given in."""

import re
import shutil
from pathlib import Path

import pytest

from lmforge.model.adapters import record_base_model
from lmforge.model.loader import alias_gguf_path
from lmforge.train.outputs import write_model_card

ALIAS = "smollm2-135m-instruct"


@pytest.fixture()
def cached_alias(tiny_llama_dir, tmp_path, monkeypatch):
    """The alias's de-quantized directory, already in a fresh cache (the tiny model stands in for SmolLM2)."""
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    return Path(shutil.copytree(tiny_llama_dir, tmp_path / "cache" / "models" / ALIAS))


def card(out: Path, base_model: str, is_adapter: bool) -> tuple[str, str]:
    """The card's text and its Python snippet."""
    text = write_model_card(out, base_model=base_model, stage="sft", method="lora" if is_adapter else "full",
                            datasets="demo", hyperparameters={}, results={}, is_adapter=is_adapter).read_text()
    return text, re.search(r"```python\n(.*?)```", text, re.S).group(1)


def loaded_paths(snippet: str) -> list[str]:
    return re.findall(r"from_pretrained\((?:base, )?'([^']*)'\)", snippet)


def save_adapter(base_dir: Path, out: Path, base_model: str) -> Path:
    """A LoRA adapter on the tiny model whose adapter_config names `base_model`, as training records it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
    model.save_pretrained(out)
    record_base_model(str(out), base_model)
    return out


@pytest.mark.parametrize("form", ["alias", "gguf"])
def test_an_alias_or_gguf_base_is_written_as_its_local_directory_and_the_snippet_loads(cached_alias, tmp_path, form):
    base_model = ALIAS if form == "alias" else str(alias_gguf_path(ALIAS))
    out = save_adapter(cached_alias, tmp_path / "lora", base_model)
    text, snippet = card(out, base_model, is_adapter=True)
    assert loaded_paths(snippet) == [str(cached_alias), str(out.resolve())]
    assert "local to this machine" in text
    namespace: dict = {}
    exec(snippet, namespace)  # offline: a hub name in the snippet would fail here
    assert type(namespace["model"]).__name__ == "PeftModelForCausalLM"


def test_a_plain_directory_is_written_as_its_absolute_path(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_llama_dir.parent)
    out = save_adapter(tiny_llama_dir, tmp_path / "lora", tiny_llama_dir.name)
    _, snippet = card(out, tiny_llama_dir.name, is_adapter=True)
    assert loaded_paths(snippet) == [str(tiny_llama_dir.resolve()), str(out.resolve())]


def test_a_full_model_snippet_loads_the_output_dir(tiny_llama_dir, tmp_path, monkeypatch):
    out = Path(shutil.copytree(tiny_llama_dir, tmp_path / "full"))
    monkeypatch.chdir(tmp_path)
    _, snippet = card(Path("full"), ALIAS, is_adapter=False)
    assert loaded_paths(snippet) == [str(out.resolve())]
