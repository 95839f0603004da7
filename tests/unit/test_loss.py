"""Chunked linear cross-entropy equals the plain computation: loss and every gradient."""

import pytest
import torch

import lmforge.train.loss as loss_module
from lmforge.train.loss import capture_head_input, chunkable_head, linear_cross_entropy


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("normalizer", [None, 37])
def test_loss_and_gradients_equal_plain_cross_entropy(monkeypatch, bias, normalizer):
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 300 * 4)  # chunks of 4 rows
    torch.manual_seed(0)
    B, T, H, V = 3, 11, 16, 300
    head = torch.nn.Linear(H, V, bias=bias)
    hidden = torch.randn(B, T, H, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    labels[0, :4] = -100
    labels[2, 7:] = -100
    got = linear_cross_entropy(hidden, head, labels, normalizer)
    got.backward()
    grads = [hidden.grad.clone(), head.weight.grad.clone()] + ([head.bias.grad.clone()] if bias else [])
    hidden.grad = None
    head.zero_grad()
    logits = head(hidden)[:, :-1]  # (B, T-1, V): the full tensor the chunked path never builds
    reduction = "mean" if normalizer is None else "sum"
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100,
                                            reduction=reduction)
    ref = ref if normalizer is None else ref / normalizer
    ref.backward()
    assert got.item() == pytest.approx(ref.item(), abs=1e-5)
    refs = [hidden.grad, head.weight.grad] + ([head.bias.grad] if bias else [])
    for g, r in zip(grads, refs):
        assert (g - r).abs().max().item() <= 1e-5


def test_frozen_head_gets_no_gradient_and_head_sees_nothing():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False).requires_grad_(False)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    with capture_head_input(head) as captured:
        out = head(hidden)
    assert out.shape == (2, 0, 50) and captured["hidden"] is hidden
    linear_cross_entropy(hidden, head, torch.randint(0, 50, (2, 5))).backward()
    assert head.weight.grad is None and hidden.grad is not None


def test_only_plain_linear_heads_are_chunked(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert chunkable_head(model) is model.lm_head
    model.config.final_logit_softcapping = 30.0
    assert chunkable_head(model) is None
