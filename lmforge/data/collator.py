"""Batch tokenized examples: right padding, or packed rows with per-example attention isolation.

Every batch also carries `num_real_tokens`, `num_positions` and `num_rows` (plain ints, removed by the trainer
before the forward pass) so throughput and padding are measured on what the model really computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lmforge.data.processors import IGNORE_INDEX

VARLEN_SDPA = "lmforge_varlen_sdpa"  # lmforge.model.varlen registers it (kept here: no model import)

CAUSAL_ONLY_KEY = "mask_is_trailing_padding"
HOST_LENGTHS_KEY = "example_lengths"  # packed example lengths as a tuple of ints (lmforge.model.varlen reads it)


def drop_redundant_mask(inputs: dict[str, Any]) -> dict[str, Any]:
    """Remove the attention mask of a flagged right-padded batch (see `PaddingCollator`)."""
    if inputs.pop(CAUSAL_ONLY_KEY, False):
        inputs.pop("attention_mask", None)
    return inputs


COUNT_KEYS = ("num_real_tokens", "num_positions", "num_rows")


def segment_ids(lengths: list[list[int]], width: int) -> torch.Tensor:
    """(B, T) id of the example each position belongs to; padding is one more segment of its own."""
    seg = torch.empty(len(lengths), width, dtype=torch.long)
    for row, parts in enumerate(lengths):
        ids = torch.repeat_interleave(torch.arange(len(parts)), torch.tensor(parts, dtype=torch.long))
        seg[row, : len(ids)] = ids
        seg[row, len(ids):] = len(parts)
    return seg


def block_causal_mask(seg: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool, True where query i may attend key j: same segment and j <= i.

    Padding positions form their own causal segment, so no query row is fully masked (which would
    give NaN under sdpa).
    """
    width = seg.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()  # (T, T)
    same = seg[:, :, None] == seg[:, None, :]  # (B, T, T)
    return (same & causal)[:, None]


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """eager attention adds the mask to the scores: 0 where allowed, the dtype's minimum elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def position_ids_for(lengths: list[list[int]], width: int) -> torch.Tensor:
    """Position ids restarting at 0 for each packed sequence: each sample sees the positions it has alone."""
    pos = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, parts in enumerate(lengths):
        ids = torch.cat([torch.arange(n) for n in parts])
        pos[row, : len(ids)] = ids
        pos[row, len(ids):] = torch.arange(width - len(ids))
    return pos


def _pad(rows: list[list[int]], width: int, value: int) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


@dataclass
class PaddingCollator:
    """Unpacked examples, right-padded.

    With `causal_mask_only` (lmforge's default for causal LMs) the batch is flagged so that the
    attention mask is dropped just before the forward (`drop_redundant_mask`): padding sits after
    every real token, so under causal attention no real token can see it, and the pad positions
    carry no loss. Logits at real positions and the loss are identical (tested), and the attention
    kernels take their faster `is_causal` path instead of an explicit mask. The mask stays in the
    collated batch so that anything that counts padding from it (callbacks, profilers) still can.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    causal_mask_only: bool = False

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = [f["input_ids"] for f in features]
        mask = _pad([[1] * len(x) for x in ids], width, 0)
        batch = {
            "input_ids": _pad(ids, width, self.pad_token_id),  # (B, T)
            "attention_mask": mask,
            "labels": _pad([f["labels"] for f in features], width, IGNORE_INDEX),
            "num_real_tokens": int(mask.sum()), "num_positions": mask.numel(), "num_rows": len(features),
        }
        if self.causal_mask_only:
            batch[CAUSAL_ONLY_KEY] = True
        return batch


@dataclass
class PackedCollator:
    """Packed rows (`lengths` per row) with examples isolated on every attention backend.

    flash_attention_2: all rows flattened into one (1, N) row with per-example position_ids and the example
    boundaries (`cu_seq_lens_q/k`, `max_length_q/k` as host ints), which transformers hands to flash-attn's
    variable-length kernel. VARLEN_SDPA (what `train` uses for
    sdpa): the same flattened row plus the boundaries `cu_seq_lens_q`, one causal sdpa call per example
    (lmforge/model/varlen.py). sdpa: a boolean block-diagonal causal mask. eager: the same mask as
    additive floats (eager adds the mask to the scores, so a boolean one would be wrong).
    """

    pad_token_id: int
    attn_implementation: str = "sdpa"

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        lengths = [list(f["lengths"]) for f in features]
        real = sum(sum(parts) for parts in lengths)
        if self.attn_implementation.startswith("flash") or self.attn_implementation == VARLEN_SDPA:
            flat = [[t for f in features for t in f["input_ids"]]]
            examples = [n for parts in lengths for n in parts]
            batch = {
                "input_ids": _pad(flat, real, self.pad_token_id),  # (1, N)
                "labels": _pad([[t for f in features for t in f["labels"]]], real, IGNORE_INDEX),
                "position_ids": position_ids_for([examples], real),
                "num_real_tokens": real, "num_positions": real, "num_rows": len(features),
            }
            ends = torch.tensor(examples, dtype=torch.long).cumsum(0)
            bounds = torch.cat([torch.zeros(1, dtype=torch.long), ends])  # example boundaries
            if self.attn_implementation.startswith("flash"):
                # flash_attn_varlen_func's arguments, ready: transformers would otherwise derive them from
                # position_ids in every layer, reading the longest example back from the GPU each time
                batch |= {"cu_seq_lens_q": bounds.int(), "cu_seq_lens_k": bounds.int(),
                          "max_length_q": max(examples), "max_length_k": max(examples)}
            if self.attn_implementation == VARLEN_SDPA:
                batch["cu_seq_lens_q"] = bounds
                # the same lengths as host ints: the model passes its keyword arguments down to each attention
                # call, which then splits the row without reading cu_seq_lens_q back from the device
                batch[HOST_LENGTHS_KEY] = tuple(examples)
            return batch
        width = max(len(f["input_ids"]) for f in features)
        allowed = block_causal_mask(segment_ids(lengths, width))
        mask = allowed if self.attn_implementation == "sdpa" else additive_mask(allowed)
        return {
            "input_ids": _pad([f["input_ids"] for f in features], width, self.pad_token_id),  # (B, T)
            "labels": _pad([f["labels"] for f in features], width, IGNORE_INDEX),
            "position_ids": position_ids_for(lengths, width),
            "attention_mask": mask,  # (B, 1, T, T)
            "num_real_tokens": real, "num_positions": len(features) * width, "num_rows": len(features),
        }
