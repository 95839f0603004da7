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
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward, use_gqa_in_sdpa

from lmforge.compat import attention_registered
from lmforge.data.collator import HOST_LENGTHS_KEY, VARLEN_SDPA


def varlen_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          **kwargs: Any) -> tuple[torch.Tensor, None]:
    """query (1, H, N, D), key/value (1, Hkv, N, D) -> (1, N, H, D): causal attention within each example."""
    bounds = kwargs.pop("cu_seq_lens_q", None)
    host_lengths = kwargs.pop(HOST_LENGTHS_KEY, None)
    if bounds is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        # not a packed training batch (generation with a cache, or an unpacked batch): plain sdpa
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    lengths = example_lengths(bounds, host_lengths, query.shape[2])
    # Mistral and Mixtral pass the window as an argument (None: no window); others may set it on the module only
    window = kwargs["sliding_window"] if "sliding_window" in kwargs else getattr(module, "sliding_window", None)
    dropout = dropout if module.training else 0.0
    outputs = []
    # split, not slicing: its backward is one concatenation, where each slice's backward would write
    # into its own full-size zero tensor
    for q, k, v in zip(query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2)):
        n, mask = q.shape[2], None
        if window and n > window:  # the layer's sliding window bites inside this example
            pos = torch.arange(n, device=q.device)
            offset = pos[:, None] - pos[None, :]
            mask = (offset >= 0) & (offset < window)  # (n, n) bool
        k, v, gqa = grouped_heads(q, k, v, mask)
        outputs.append(torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None and n > 1, scale=scaling,
            enable_gqa=gqa))  # (1, H, n, D)
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def example_lengths(bounds: torch.Tensor, host: tuple[int, ...] | None, total: int) -> list[int]:
    """The packed examples' lengths: the collator's host copy when it covers the row (no device sync in a
    layer, on every layer and again in gradient checkpointing's recompute), else read from the boundaries."""
    if host is not None and sum(host) == total:
        return list(host)
    return bounds.diff().tolist()


def grouped_heads(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(key, value, enable_gqa) for grouped-query attention: sdpa's own grouping where the kernel supports it
    (transformers' rule: on CUDA only without a mask, else sdpa falls back to its slow math kernel), otherwise
    the key/value heads repeated as transformers' sdpa path does."""
    groups = query.shape[1] // key.shape[1]
    if groups == 1:
        return key, value, False
    if use_gqa_in_sdpa(mask, key, value):
        return key, value, True
    return repeat_kv(key, groups), repeat_kv(value, groups), False


def use_varlen_sdpa(model: torch.nn.Module) -> str:
    """Switch `model` (or the base model under an adapter) from sdpa to `VARLEN_SDPA` and return that name,
    or return "sdpa" (packed rows then get the block-diagonal mask) for a model whose attention does not go
    through transformers' AttentionInterface: transformers only warns and keeps sdpa there, and a flattened
    row without a mask would let its examples see each other."""
    if not attention_registered(VARLEN_SDPA):
        AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(VARLEN_SDPA)
    return VARLEN_SDPA if base.config._attn_implementation == VARLEN_SDPA else "sdpa"
