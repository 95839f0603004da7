"""Next-token loss without the full `[batch, seq, vocab]` logits.

The output head's input is captured by a forward pre-hook (the head itself then sees an empty slice
and computes nothing). Cross-entropy runs only at positions that carry loss, in chunks of rows, and
the gradients for the hidden states and the head are computed in the same pass (as Liger's fused
linear cross-entropy does), so peak memory is one chunk of logits rather than all of them.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from lmforge.data.processors import IGNORE_INDEX

CHUNK_ELEMENTS = 1 << 25  # ~128 MB of float32 logits per chunk


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ W^T + b, target_i) / normalizer, with gradients precomputed in forward."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, normalizer: torch.Tensor | float) -> torch.Tensor:
        # hidden (M, H) at loss positions only; weight (V, H); targets (M,)
        # No float32 copy of the head: each chunk's logits come from the head in its own dtype (as the model's
        # lm_head computes them) and are upcast per chunk. Memory per chunk: logits and their gradient,
        # 2 x CHUNK_ELEMENTS float32 (256 MB). The head's gradient is summed in float32 while the chunks run
        # and kept in the head's dtype until backward.
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            chunk = max(1, CHUNK_ELEMENTS // weight.shape[0])
            grad_h = torch.empty_like(hidden) if hidden.requires_grad else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if weight.requires_grad \
                else None
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) \
                if bias is not None and bias.requires_grad else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk):
                h = hidden[start:start + chunk].to(weight.dtype)  # (c, H)
                t = targets[start:start + chunk]
                logits = (h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)).float()  # (c, V)
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                if grad_h is None and grad_w is None and grad_b is None:
                    continue
                d_logits = torch.softmax(logits, dim=-1)  # d(sum CE)/d logits = softmax - onehot
                del logits
                d_logits[torch.arange(len(t), device=t.device), t] -= 1
                if grad_h is not None:
                    grad_h[start:start + chunk] = (d_logits.to(weight.dtype) @ weight).to(hidden.dtype)
                if grad_w is not None:
                    grad_w += d_logits.T @ h.float()
                if grad_b is not None:
                    grad_b += d_logits.sum(0)
            grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
            grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in (grad_h, grad_w, grad_b)))
        ctx.present = (grad_h is not None, grad_w is not None, grad_b is not None)
        ctx.normalizer = normalizer
        return total / normalizer

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        scale = grad_out / ctx.normalizer
        grad_h, grad_w, grad_b = ctx.saved_tensors
        has_h, has_w, has_b = ctx.present
        return (grad_h * scale.to(grad_h.dtype) if has_h else None,
                grad_w * scale.to(grad_w.dtype) if has_w else None,
                grad_b * scale.to(grad_b.dtype) if has_b else None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor,
                         num_items_in_batch: Any = None) -> torch.Tensor:
    """Causal-LM loss from the head's input: hidden (B, T, H), labels (B, T) unshifted."""
    hidden, targets = hidden[:, :-1], labels[:, 1:]  # position t predicts token t + 1
    keep = targets != IGNORE_INDEX
    normalizer = num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp(min=1)
    if isinstance(normalizer, torch.Tensor):
        normalizer = normalizer.to(hidden.device).float()
    return LinearCrossEntropy.apply(hidden[keep], head.weight, head.bias, targets[keep], normalizer)


@contextlib.contextmanager
def capture_head_input(head: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """While active, the head receives an empty slice and its real input is stored in the dict."""
    captured: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        captured["hidden"] = args[0]
        return (args[0][:, :0], *args[1:])

    handle = head.register_forward_pre_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


# Model types whose forward computes logits as plain `lm_head(hidden)` (checked in transformers' modeling
# files). Others may post-process them (Granite divides by logits_scaling, Cohere multiplies by logit_scale,
# Gemma 2/3 soft-cap), which the chunked loss would silently skip.
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
                                    "gemma", "phi3", "olmo2", "smollm3"})


def chunkable_head(model: nn.Module) -> nn.Linear | None:
    """The plain linear output head of a causal LM whose loss is plain cross-entropy of `lm_head(h)`, or None
    (the model computes its own loss) for any other model type or when its loss adds a MoE router loss."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return None
    if getattr(config, "output_router_logits", False):  # the model's loss adds the router's auxiliary loss
        return None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    return head if type(head) is nn.Linear else None
