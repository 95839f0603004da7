"""`lmforge export --export_format gguf`: one .gguf file for llama.cpp, Ollama and LM Studio, written with the
`gguf` package's writer (no llama.cpp build), then read back with transformers' GGUF reader before it is put
in place: a config that would load back differently refuses the export, a tokenizer that would tokenize
differently is reported."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from lmforge.errors import LmforgeError
from lmforge.export.gguf_vocab import add_vocab, build_vocab

logger = logging.getLogger(__name__)
TOKENIZER_PROBE = "Hello world! 你好，世界 🚀 code: x=1; 12345 <|im_start|>\n\tend"
PROBE_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi! 你好"},
              {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]


@dataclass(frozen=True)
class GgufArch:
    """How one transformers model_type is written: llama.cpp's architecture name, and whether the Q/K rows
    are permuted into llama.cpp's rotary layout (Llama-type models; transformers' reader permutes them back)."""

    name: str
    permute_qk: bool


ARCHS = {
    "llama": GgufArch("llama", permute_qk=True),
    "mistral": GgufArch("llama", permute_qk=True),  # llama.cpp runs Mistral as llama, as its converter writes it
    "qwen2": GgufArch("qwen2", permute_qk=False),
    "qwen3": GgufArch("qwen3", permute_qk=False),
}
# name -> (tensor type of 2-D weights, llama.cpp's general.file_type)
TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
         "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q5_1": ("Q5_1", "MOSTLY_Q5_1"), "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
         "q4_1": ("Q4_1", "MOSTLY_Q4_1"), "q4_0": ("Q4_0", "MOSTLY_Q4_0")}
LOW_BIT = ("Q5_1", "Q5_0", "Q4_1", "Q4_0")  # their output projection is kept at Q8_0, as llama-quantize keeps it higher


def gguf_arch(config: Any) -> GgufArch:
    """The GGUF layout of this model, or a one-line error naming the supported architectures."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise LmforgeError(f"GGUF export supports the architectures {', '.join(ARCHS)} (those transformers reads "
                           f"back from GGUF with a tokenizer lmforge trains); this model is {model_type}")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise LmforgeError(f"GGUF export writes default RoPE only; this model uses rope_type "
                           f"{rope['rope_type']}, which transformers would not read back from the file")
    window = getattr(config, "sliding_window", None)
    if model_type == "mistral" and window and window < config.max_position_embeddings:
        logger.warning("GGUF export: llama.cpp runs Mistral as llama, without the %d-token sliding window", window)
    return ARCHS[model_type]


def rope_theta(config: Any) -> float:
    """The RoPE base frequency (transformers 5 keeps it in rope_parameters)."""
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def head_dim(config: Any) -> int:
    """Per-head width: the config's head_dim, or hidden_size / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def add_architecture(writer: Any, config: Any, arch: GgufArch, vocab_rows: int, name: str, file_type: int) -> None:
    """The `<arch>.*` and `general.*` keys llama.cpp and transformers read the model's shape from."""
    import gguf

    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(vocab_rows)
    writer.add_rope_dimension_count(head_dim(config))
    if head_dim(config) != config.hidden_size // config.num_attention_heads or arch.name == "qwen3":
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def permute_rotary(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for a Q or K projection (its converter's `permute`): per head, the interleaved
    rotary pairs of Meta's layout instead of transformers' two halves."""
    rows = weights.shape[0]
    return (weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])  # (H, 2, D/2, ...)
            .swapaxes(1, 2).reshape(weights.shape))


def encode(data: np.ndarray, qtype: Any, keep_high: bool) -> tuple[np.ndarray, Any]:
    """(bytes or floats, GGML type) of one tensor: 1-D stays f32; a row that is no whole number of blocks
    falls back to f16, as in llama.cpp's converter."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    if data.ndim == 1 or qtype == GGMLQuantizationType.F32:
        return data.astype(np.float32), GGMLQuantizationType.F32
    if keep_high and qtype.name in LOW_BIT:
        qtype = GGMLQuantizationType.Q8_0
    if data.shape[-1] % GGML_QUANT_SIZES[qtype][0]:
        qtype = GGMLQuantizationType.F16
    return quants.quantize(data, qtype), qtype


def tensor_names(model: Any, arch: GgufArch) -> dict[str, str]:
    """HF state-dict name -> GGUF name, through gguf's tensor name map; a tied lm_head has none (llama.cpp
    and transformers both use token_embd when output.weight is absent)."""
    import gguf

    config = model.config
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch.name)
    name_map = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    names = {}
    for hf_name in model.state_dict():
        if tied and hf_name == "lm_head.weight":
            continue
        base, _, suffix = hf_name.rpartition(".")
        mapped = name_map.get_name(base)
        if mapped is None:
            raise LmforgeError(f"GGUF export: the {config.model_type} tensor {hf_name} has no GGUF name")
        names[hf_name] = f"{mapped}.{suffix}"
    return names


def gguf_tensors(model: Any, arch: GgufArch, qtype: Any) -> Iterator[tuple[str, np.ndarray, Any]]:
    """(GGUF name, data, type) of every weight; Q/K rows permuted for Llama-type architectures."""
    config = model.config
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = model.state_dict()
    for hf_name, name in tensor_names(model, arch).items():
        data = state[hf_name].detach().to(device="cpu", dtype=torch.float32).numpy()
        if arch.permute_qk and ".attn_q." in name:
            data = permute_rotary(data, config.num_attention_heads)
        elif arch.permute_qk and ".attn_k." in name:
            data = permute_rotary(data, kv_heads)
        output = name == "output.weight" or (tied and name == "token_embd.weight")
        yield (name, *encode(data, qtype, keep_high=output))


def write_gguf(model: Any, tokenizer: Any, path: Path, gguf_type: str, name: str) -> dict[str, Any]:
    """Write the model and tokenizer to `path` through a temporary file in the same folder, check what
    transformers reads back, then rename it into place; returns the read-back findings."""
    import gguf

    arch = gguf_arch(model.config)
    qtype, file_type = (getattr(gguf.GGMLQuantizationType, TYPES[gguf_type][0]),
                        getattr(gguf.LlamaFileType, TYPES[gguf_type][1]))
    rows = model.get_input_embeddings().weight.shape[0]
    vocab = build_vocab(tokenizer, rows)
    partial = path.with_name(f".{path.stem}.partial.gguf")
    stub = path.with_name(f".{path.stem}.config.gguf")
    try:
        stub_tensors = ((n, np.zeros(1, np.float32), None) for n in tensor_names(model, arch).values())
        _write(stub, arch, lambda w: add_architecture(w, model.config, arch, rows, name, file_type), stub_tensors)
        check_config_round_trip(stub, model.config, rows)
        _write(partial, arch, lambda w: (add_architecture(w, model.config, arch, rows, name, file_type),
                                         add_vocab(w, vocab)), gguf_tensors(model, arch, qtype))
        mismatch = tokenizer_round_trip(partial, tokenizer)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
        stub.unlink(missing_ok=True)
    return {"tokenizer_pre": vocab.pre, "add_bos": vocab.add_bos, "tokenizer_round_trip": mismatch is None,
            "tokenizer_mismatch": mismatch}


def _write(path: Path, arch: GgufArch, add_metadata: Any, tensors: Iterator[tuple[str, np.ndarray, Any]]) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch.name)
    try:
        add_metadata(writer)
        for tensor_name, data, raw_type in tensors:
            writer.add_tensor(tensor_name, data, raw_dtype=raw_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


CONFIG_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings")


def check_config_round_trip(path: Path, config: Any, rows: int) -> None:
    """Refuse a model from which transformers would read a different config back. `path` holds the file's
    architecture metadata and tensor names only: the reader's config pass parses every token otherwise."""
    from transformers import AutoConfig

    read = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    expected = {f: getattr(config, f, None) for f in CONFIG_FIELDS}
    expected |= {"vocab_size": rows, "head_dim": head_dim(config), "rope_theta": rope_theta(config),
                 "rms_norm_eps": config.rms_norm_eps}
    got = {f: getattr(read, f, None) for f in CONFIG_FIELDS}
    got |= {"vocab_size": read.vocab_size, "head_dim": head_dim(read), "rope_theta": rope_theta(read),
            "rms_norm_eps": read.rms_norm_eps}
    for field, value in expected.items():
        same = abs(got[field] - value) <= 1e-6 * abs(value) if isinstance(value, float) else got[field] == value
        if not same:
            raise LmforgeError(f"transformers would read {field} = {got[field]} back from the GGUF file, but the "
                               f"{config.model_type} model has {value}: such a model cannot be written as GGUF "
                               "(nothing was written)")


def tokenizer_round_trip(path: Path, tokenizer: Any) -> str | None:
    """Where the tokenizer transformers builds from the file differs from the exported one (None: the same ids
    on a mixed-script probe, and the same chat template). Uses the reader's tokenizer builder directly, as
    AutoTokenizer would: its config pass alone parses every token in Python (~15 s for 49k tokens)."""
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    architecture, tokenizer_dict, config = get_gguf_tokenizer(str(path))
    backend, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    ours = tokenizer(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    theirs = backend.encode(TOKENIZER_PROBE, add_special_tokens=False).ids
    if ours != theirs:
        return f"token ids of {TOKENIZER_PROBE!r}: {ours} exported, {theirs} read back"
    if config.get("chat_template") != (tokenizer.chat_template or None):
        return "the chat template differs when read back"
    return None
