"""A tokenizer's byte-level BPE run by tiktoken: the same ids, 3-8x faster per core, for pt corpora.

Tokenizing a corpus into shards spends nearly all its time in the tokenizer. Hugging Face tokenizers tracks
the offsets and alignments of every piece, which shards never use; tiktoken splits with the same regex and
merges by the same ranks without them (bench/RESULTS.md has the figures). It stands in only where it gives
the tokenizer's own ids:

- the tokenizer is a byte-level BPE pre-tokenized by the GPT-2 regex (GPT-2), by it with each digit split
  off first (SmolLM2), or by one Split regex before a regex-free byte level (Llama 3, Qwen2); with no dropout
  or byte fallback, and no normalizer but NFC or NFKC (Qwen2's NFC, applied first by Python's unicodedata);
  tiktoken's ranks are the merges' order, the first merge forming a token giving it its rank;
- a text holding an added token's text goes to the tokenizer itself (it matches those before its BPE), as
  does one where tiktoken forms a token the vocabulary lacks;
- tiktoken looks a whole piece up before merging, as BPE with `ignore_merges` does: for a tokenizer without
  it, every token tiktoken can form must be one the tokenizer's BPE forms from its own text;
- before a run both encode a probe text and the first batch of the run's first line-cut input; any
  difference and the run uses the tokenizer itself, with a warning.

LMFORGE_FAST_BPE=0 turns it off.
"""

from __future__ import annotations

import json
import logging
import os
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)
NORMAL_FORMS = ("NFC", "NFKC")  # normalizers Python's unicodedata applies as tokenizers does
GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Digits(individual_digits) then the GPT-2 regex (SmolLM2's tokenizer.json): each digit alone, and the regex
# run on the text between digits, where a digit ends a stretch as the end of the text does for \s+(?!\S)
GPT2_DIGITS_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
PROBE = ("Hello world! It's 2026: don't we'll they've I'm you'd 12345 3.14159 -42 ids[0] += x**2;\n\n"
         "    def f(a, b):\n\treturn a  +  b   \r\n  trailing spaces   \n"
         "Ünïcödé naïve café — “quotes” ‘single’ … 日本語のテキスト 中文文本 한국어 텍스트 Ελληνικά Русский текст "
         "עברית العربية हिन्दी ไทย 😀👍🏽 🇺🇳 \u200b\u00a0\u3000 mixed123abc ABC's ÀÉÎ aaaaaaaaaaaaaaaa ------- ....")


class Unsupported(Exception):
    """Why tiktoken cannot stand in for a tokenizer."""


def _gpt2_level(pre: dict[str, Any]) -> bool:
    return pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")


def _split_regex(pre: dict[str, Any] | None) -> str:
    """The one regex that splits text into pieces, from a tokenizers pre_tokenizer description."""
    if pre and _gpt2_level(pre):
        return GPT2_REGEX
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else []
    if (len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits")
            and _gpt2_level(steps[1])):
        return GPT2_DIGITS_REGEX
    if len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel":
        split, level = steps
        if ("Regex" in split.get("pattern", {}) and split.get("behavior") == "Isolated" and not split.get("invert")
                and not level.get("use_regex", True) and not level.get("add_prefix_space")):
            return split["pattern"]["Regex"]
    raise Unsupported(f"pre-tokenizer {json.dumps(pre)[:120]} is not a byte-level regex split")


def _normal_form(normalizer: dict[str, Any] | None) -> str | None:
    """The Unicode normal form a tokenizer's normalizer applies (Qwen2's NFC), None for none."""
    if normalizer is None:
        return None
    if normalizer.get("type") in NORMAL_FORMS:
        return normalizer["type"]
    raise Unsupported(f"it normalizes text ({normalizer.get('type')})")


def _check_model(spec: dict[str, Any]) -> None:
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise Unsupported(f"its model is {model.get('type')}, not BPE")
    extras = {k: model.get(k) for k in ("dropout", "byte_fallback", "continuing_subword_prefix", "end_of_word_suffix")
              if model.get(k)}
    if extras:
        raise Unsupported(f"its BPE sets {extras}")


@dataclass
class FastBPE:
    """tiktoken with the tokenizer's regex and ranks; `ids` maps tiktoken's ranks to the tokenizer's ids."""

    encoding: Any
    ids: np.ndarray  # rank -> the tokenizer's id, -1 where its vocabulary lacks the token
    added: re.Pattern[str] | None  # texts the tokenizer matches before its BPE (texts holding one go through it)
    tokenizer: Any
    normal_form: str | None = None  # applied to each text first, as the tokenizer's normalizer does

    @classmethod
    def build(cls, tokenizer: Any) -> FastBPE:
        """tiktoken set up as `tokenizer` (a transformers fast tokenizer); Unsupported says why it cannot be."""
        import tiktoken
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise Unsupported("it has no fast (Rust) tokenizer")
        spec = json.loads(backend.to_str())
        _check_model(spec)
        normal_form = _normal_form(spec.get("normalizer"))
        regex = _split_regex(spec.get("pre_tokenizer"))
        char_of = bytes_to_unicode()  # byte -> the printable character byte-level BPE writes it as
        byte_of = {char: byte for byte, char in char_of.items()}
        ranks = {bytes([b]): b for b in range(256)}
        for merge in spec["model"]["merges"]:
            left, right = merge.split(" ") if isinstance(merge, str) else merge
            ranks.setdefault(bytes(byte_of[c] for c in left + right), len(ranks))
        ids = np.full(len(ranks), -1, dtype=np.int64)
        for text, token_id in spec["model"]["vocab"].items():
            rank = ranks.get(bytes(byte_of[c] for c in text)) if all(c in byte_of for c in text) else None
            if rank is not None:
                ids[rank] = token_id
        texts = sorted({t["content"] for t in spec.get("added_tokens", []) if t.get("content")}, key=len, reverse=True)
        added = re.compile("|".join(map(re.escape, texts))) if texts else None  # one pass, however many
        encoding = tiktoken.Encoding("lmforge", pat_str=regex, mergeable_ranks=ranks, special_tokens={})
        fast = cls(encoding, ids, added, tokenizer, normal_form)
        if not spec["model"].get("ignore_merges"):
            fast._check_whole_tokens(ranks, backend.model, char_of)
        return fast

    def _check_whole_tokens(self, ranks: dict[bytes, int], model: Any, char_of: dict[int, str]) -> None:
        """tiktoken takes a piece that is a whole token as that token; BPE without ignore_merges merges it."""
        for token, rank in ranks.items():
            if len(token) > 1 and self.ids[rank] >= 0:
                formed = [t.id for t in model.tokenize("".join(char_of[b] for b in token))]
                if formed != [int(self.ids[rank])]:
                    raise Unsupported(f"its BPE splits its own token {token!r} into {formed}")

    def encode(self, texts: list[str]) -> list[list[int]]:
        """The tokenizer's ids of each text, without special tokens (as `tokenizer(texts)["input_ids"]`)."""
        return [ids.tolist() for ids in self.encode_arrays(texts)]

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """`encode`'s ids as int64 arrays: shards are written from them without a Python int per token."""
        out: list[np.ndarray | None] = [None] * len(texts)
        odd = self._with_added(texts)
        normal = [unicodedata.normalize(self.normal_form, t) for t in texts] if self.normal_form else texts
        if normal is not texts:  # an added token may be matched in the normalized text too
            odd |= self._with_added(normal)
        for i, text in enumerate(normal):
            if i in odd:
                continue
            ids = self.ids[np.asarray(self.encoding.encode_ordinary(text), dtype=np.int64)]
            if (ids < 0).any():
                odd.add(i)
            else:
                out[i] = ids
        if odd:
            order = sorted(odd)
            slow = self.tokenizer([texts[i] for i in order], add_special_tokens=False,
                                  return_attention_mask=False)["input_ids"]
            for i, ids in zip(order, slow):
                out[i] = np.asarray(ids, dtype=np.int64)
        return out  # type: ignore[return-value]

    def _with_added(self, texts: list[str]) -> set[int]:
        """Indices of the texts holding an added token's text (checked on the whole batch first: rarely any)."""
        if self.added is None or not self.added.search("\0".join(texts)):
            return set()
        return {i for i, t in enumerate(texts) if self.added.search(t)}

    def agrees(self, texts: list[str]) -> str | None:
        """None when tiktoken gives the tokenizer's ids for every text, else the first text that differs."""
        ours = self.encode(texts)
        theirs = self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        return next((t[:60] for t, a, b in zip(texts, ours, theirs) if a != b), None)


def fast_bpe(tokenizer: Any, sample: list[str]) -> FastBPE | None:
    """tiktoken standing in for `tokenizer` when it gives the same ids on the probe and `sample`, else None
    (the tokenizer itself does the work; the log says why)."""
    if os.environ.get("LMFORGE_FAST_BPE", "1") == "0":
        return None
    try:
        fast = FastBPE.build(tokenizer)
    except ImportError:
        logger.info("tokenizing with the tokenizer itself: tiktoken is not installed")
        return None
    except Unsupported as why:
        logger.info("tokenizing with the tokenizer itself: tiktoken cannot stand in for it: %s", why)
        return None
    differs = fast.agrees([PROBE, *sample])
    if differs is not None:
        logger.warning("tiktoken's BPE gives other ids than the tokenizer for %r: tokenizing with the tokenizer "
                       "itself (slower)", differs)
        return None
    logger.info("tokenizing with tiktoken's BPE: the tokenizer's ids, checked on a probe and the first batch")
    return fast
