"""The tokenizer as GGUF metadata: vocabulary, merges, token types, special token ids, add_bos and the
chat template, in the layout llama.cpp's converter writes and transformers' GGUF reader reads back."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from lmforge.errors import LmforgeError

logger = logging.getLogger(__name__)
# llama.cpp's token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# the names llama.cpp gives a pre-tokenizer regex, preferred over the aliases the reader also knows
CANONICAL_PRE = ("llama-bpe", "qwen2", "gpt-4o", "tekken", "qwen35")


@dataclass
class GgufVocab:
    """Everything under `tokenizer.*` in a GGUF file."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece BPE)
    pre: str  # llama.cpp's name for the pre-tokenizer (how text is split before BPE)
    tokens: list[str]
    types: list[int]
    merges: list[str]
    scores: list[float] | None
    special_ids: dict[str, int]  # bos, eos, unk, pad
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    chat_template: str | None


def _backend(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LmforgeError(f"GGUF export needs a fast (tokenizers) tokenizer; {type(tokenizer).__name__} is not one")
    return json.loads(backend.to_str())


def _parts(node: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    """The steps of a pre-tokenizer or normalizer, whether a Sequence or a single one."""
    if not node:
        return []
    return node.get(key, [node]) if node.get("type") == "Sequence" else [node]


def tokenizer_kind(spec: dict[str, Any]) -> str:
    """'gpt2' for byte-level BPE (GPT-2, Llama-3, Qwen, SmolLM), 'llama' for SentencePiece BPE (Llama-2, Mistral)."""
    model = spec["model"]
    steps = [p.get("type") for p in _parts(spec.get("pre_tokenizer"), "pretokenizers")]
    if model.get("type") == "BPE" and "ByteLevel" in steps:
        return "gpt2"
    normalizers = [n.get("type") for n in _parts(spec.get("normalizer"), "normalizers")]
    if model.get("type") == "BPE" and (model.get("byte_fallback") or "Metaspace" in steps or "Prepend" in normalizers):
        return "llama"
    raise LmforgeError(f"GGUF export writes byte-level BPE (GPT-2, Llama-3, Qwen, SmolLM) and SentencePiece BPE "
                       f"(Llama-2, Mistral) tokenizers; this one is {model.get('type')} with pre-tokenizer {steps}")


def reader_pre_splits() -> dict[str, str]:
    """The pre-tokenizer regexes transformers' GGUF reader restores, by llama.cpp name (empty if it moved)."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:
        return {}
    return dict(GGUF_PRE_TOKENIZER_SPLITS)


def pre_tokenizer_name(spec: dict[str, Any]) -> str:
    """llama.cpp's name for how a byte-level tokenizer splits text: from its split regex, else 'gpt2'/'smollm'."""
    steps = _parts(spec.get("pre_tokenizer"), "pretokenizers")
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    regex = next((s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"), None)
    names = [name for name, split in reader_pre_splits().items() if split == regex]
    for name in CANONICAL_PRE:
        if name in names:
            return name
    if names:
        return names[0]
    logger.warning("GGUF export: the tokenizer's pre-tokenizer %s is not one llama.cpp names; writing 'default', "
                   "so llama.cpp may split text differently from training", kinds)
    return "default"


def _token_types(tokenizer: Any, tokens: list[str], kind: str, size: int) -> list[int]:
    added = {tok.content: tok for tok in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values()}
    types = []
    for i, token in enumerate(tokens):
        if i >= size:
            types.append(UNUSED)
        elif token in added:
            types.append(CONTROL if added[token].special else USER_DEFINED)
        elif token == tokenizer.unk_token:
            types.append(UNKNOWN)
        elif kind == "llama" and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            types.append(BYTE)
        else:
            types.append(NORMAL)
    return types


def _merges(spec: dict[str, Any]) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]


def _adds(tokenizer: Any, token_id: int | None, first: bool) -> bool:
    """Whether encoding plain text puts this special token first (BOS) or last (EOS)."""
    if token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0 if first else -1] == token_id


def _space_prefix(spec: dict[str, Any]) -> bool:
    steps = _parts(spec.get("pre_tokenizer"), "pretokenizers")
    if any(s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") != "never" for s in steps):
        return True
    return any(n.get("type") == "Prepend" for n in _parts(spec.get("normalizer"), "normalizers"))


def build_vocab(tokenizer: Any, vocab_size: int) -> GgufVocab:
    """The GGUF tokenizer metadata of a fast tokenizer, padded with unused tokens to the embedding's rows."""
    spec = _backend(tokenizer)
    kind = tokenizer_kind(spec)
    size = len(tokenizer)
    if size > vocab_size:
        raise LmforgeError(f"the tokenizer has {size} tokens but the model's embedding only {vocab_size} rows")
    by_id = tokenizer.convert_ids_to_tokens(list(range(size)))
    tokens = [tok if tok is not None else f"[PAD{i}]" for i, tok in enumerate(by_id)]
    tokens += [f"[PAD{i}]" for i in range(size, vocab_size)]  # llama.cpp needs one token per embedding row
    types = _token_types(tokenizer, tokens, kind, size)
    # SentencePiece BPE merges the pair whose result scores highest: a lower id means an earlier merge
    scores = [-float(i) if t == NORMAL else 0.0 for i, t in enumerate(types)] if kind == "llama" else None
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
           "pad": tokenizer.pad_token_id}
    return GgufVocab(
        model=kind, pre=pre_tokenizer_name(spec) if kind == "gpt2" else "default", tokens=tokens, types=types,
        merges=_merges(spec), scores=scores, special_ids={k: v for k, v in ids.items() if v is not None},
        add_bos=_adds(tokenizer, tokenizer.bos_token_id, first=True),
        add_eos=_adds(tokenizer, tokenizer.eos_token_id, first=False),
        add_space_prefix=_space_prefix(spec) if kind == "llama" else False,
        chat_template=getattr(tokenizer, "chat_template", None) or None,
    )


def add_vocab(writer: Any, vocab: GgufVocab) -> None:
    """Write the tokenizer metadata with a gguf.GGUFWriter."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id}
    for name, token_id in vocab.special_ids.items():
        adders[name](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
