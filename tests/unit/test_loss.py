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
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert chunkable_head(model) is model.lm_head
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert chunkable_head(peft_model) is model.lm_head  # the base's head under an adapter


def _tiny_causal_lm(arch: str, **extra):
    """A 2-layer, hidden-32 random causal LM of `arch` with a 128-token vocabulary, built in code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(arch, vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                  tie_word_embeddings=False, **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")


def test_llama_chunked_loss_equals_model_loss():
    model = _tiny_causal_lm("llama")
    head = chunkable_head(model)
    assert head is model.lm_head
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :3] = -100
    expected = model(input_ids=ids, labels=labels).loss
    with capture_head_input(head) as captured:
        model(input_ids=ids)
    assert linear_cross_entropy(captured["hidden"], head, labels).item() == pytest.approx(expected.item(), abs=1e-5)


@pytest.mark.parametrize("arch, extra", [
    ("granite", {"logits_scaling": 8.0}),
    ("granitemoe", {"logits_scaling": 8.0, "num_local_experts": 2, "num_experts_per_tok": 1}),
    ("cohere", {"logit_scale": 0.5}),
    ("gemma2", {"final_logit_softcapping": 5.0, "head_dim": 8}),
])
def test_heads_whose_logits_are_post_processed_are_not_chunked(arch, extra):
    # the chunked loss computes plain hidden @ W^T; these models scale or cap the head's output
    assert chunkable_head(_tiny_causal_lm(arch, **extra)) is None


def test_moe_router_loss_keeps_the_models_own_loss():
    # with output_router_logits the model's loss adds the router's auxiliary loss, which the chunked one lacks
    model = _tiny_causal_lm("mixtral", num_local_experts=2, num_experts_per_tok=1)
    assert chunkable_head(model) is model.lm_head
    model.config.output_router_logits = True
    assert chunkable_head(model) is None


def test_bf16_head_keeps_no_float32_copy_until_backward(monkeypatch):
    """In bf16 training the head's weight is not copied to float32, and what is kept from forward to backward
    is in the head's dtype; loss and gradients equal the plain bf16 head + float32 cross-entropy."""
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 64 * 3)  # several chunks
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 64, bias=False).to(torch.bfloat16)
    hidden = torch.randn(2, 9, 16, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 64, (2, 9))
    labels[0, :3] = -100
    loss = linear_cross_entropy(hidden, head, labels)
    saved = loss.grad_fn.saved_tensors
    assert all(t.dtype == torch.bfloat16 for t in saved if t.numel()), [t.dtype for t in saved]
    loss.backward()
    got = (hidden.grad.clone(), head.weight.grad.clone())
    hidden.grad, head.weight.grad = None, None
    logits = head(hidden)[:, :-1].float()  # the model's own path: bf16 head, loss in float32
    plain = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), labels[:, 1:].reshape(-1), ignore_index=-100)
    plain.backward()
    assert abs(loss.item() - plain.item()) < 1e-5
    assert head.weight.grad.dtype == got[1].dtype == torch.bfloat16
    assert torch.allclose(got[0].float(), hidden.grad.float(), atol=2e-3, rtol=2e-2)
    assert torch.allclose(got[1].float(), head.weight.grad.float(), atol=2e-3, rtol=2e-2)
