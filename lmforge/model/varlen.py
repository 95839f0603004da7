"""Variable-length attention for packed rows on the sdpa backend (CPU, and GPUs without flash-attn).

Packed examples must not attend to each other. A block-diagonal mask does that, but the kernel still
scores every query against every key of the row: a 1024-token row of ten 100-token examples costs
1024² scores where 10 x 100² would do, and an explicit mask also rules out the kernels' faster
`is_causal` path. Here the packed batch arrives as one flattened row with the example boundaries
(`cu_seq_lens_q`, as for flash-attention's varlen kernels), and each example runs as its own causal
sdpa call on its slice: no cross-example scores are computed at all, and every call takes the
`is_causal` path. Numbers equal those of the examples run one by one (tests/unit/test_packing.py).

Registered with transformers' AttentionInterface as `VARLEN_SDPA`; as that name has no mask function,
transformers builds no 4-D mask for it either.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from lmforge.data.collator import VARLEN_SDPA


def varlen_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          **kwargs: Any) -> tuple[torch.Tensor, None]:
    """query (1, H, N, D), key/value (1, Hkv, N, D) -> (1, N, H, D): causal attention within each example."""
    bounds = kwargs.pop("cu_seq_lens_q", None)
    if bounds is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        # not a packed training batch (generation with a cache, or an unpacked batch): plain sdpa
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    bounds = bounds.tolist()
    window = getattr(module, "sliding_window", None)
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        length = end - start
        mask = None
        if window and length > window:  # the layer's sliding window bites inside this example
            pos = torch.arange(length, device=query.device)
            offset = pos[:, None] - pos[None, :]
            mask = ((offset >= 0) & (offset < window))[None, None]  # (1, 1, n, n) bool
        out, _ = sdpa_attention_forward(module, query[:, :, start:end], key[:, :, start:end],
                                        value[:, :, start:end], mask, dropout=dropout, scaling=scaling,
                                        is_causal=mask is None)
        outputs.append(out)  # (1, n, H, D)
    return torch.cat(outputs, dim=1), None


def use_varlen_sdpa(model: torch.nn.Module) -> str:
    """Switch `model` (or the base model under an adapter) from sdpa to `VARLEN_SDPA`; returns the name."""
    if VARLEN_SDPA not in AttentionInterface._global_mapping:
        AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(VARLEN_SDPA)
    return VARLEN_SDPA
