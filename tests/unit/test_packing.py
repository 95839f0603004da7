"""Packing: best-fit-decreasing bins, and packed logits/loss equal to the examples run one by one."""

import random

import pytest
import torch

from lmforge.data.collator import COUNT_KEYS, PackedCollator, block_causal_mask, segment_ids
from lmforge.data.packing import best_fit_decreasing
from lmforge.data.processors import IGNORE_INDEX


def test_best_fit_decreasing_fills_bins_without_overflow():
    rng = random.Random(0)
    lengths = [rng.choice([3, 5, 8, 13, 40, 90, 100]) for _ in range(300)]
    bins = best_fit_decreasing(lengths, 100)
    assert sorted(i for b in bins for i in b) == list(range(300))
    assert all(sum(lengths[i] for i in b) <= 100 for b in bins)
    lower_bound = -(-sum(lengths) // 100)
    assert len(bins) <= lower_bound + 2, (len(bins), lower_bound)
    assert best_fit_decreasing([60, 50, 40, 30, 20], 100) == [[0, 2], [1, 3, 4]]


def make_examples(seed=0, sizes=(7, 12, 5, 9, 3, 14)):
    g = torch.Generator().manual_seed(seed)
    examples = []
    for n in sizes:
        ids = torch.randint(3, 250, (n,), generator=g).tolist()
        labels = [IGNORE_INDEX if i < n // 3 else t for i, t in enumerate(ids)]  # a masked "prompt"
        examples.append((ids, labels))
    return examples


def packed_features(examples, rows):
    return [{"input_ids": sum((examples[i][0] for i in r), []),
             "labels": sum(([IGNORE_INDEX] + examples[i][1][1:] for i in r), []),
             "lengths": [len(examples[i][0]) for i in r]} for r in rows]


def tiny(arch, impl):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(arch, vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=impl, dtype=torch.float32).eval()


ROWS = [[0, 1, 4], [2, 3], [5]]  # uneven rows: the collator pads the shorter ones


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_logits_and_loss_equal_one_by_one(arch, impl):
    model, examples = tiny(arch, impl), make_examples()
    batch = PackedCollator(0, impl)(packed_features(examples, ROWS))
    assert batch["num_real_tokens"] == sum(len(e[0]) for e in examples)
    for key in COUNT_KEYS:
        batch.pop(key)
    with torch.no_grad():
        out = model(**batch)
        total_loss, total_tokens = 0.0, 0
        for r, row in enumerate(ROWS):
            offset = 0
            for i in row:
                ids, labels = examples[i]
                single = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
                got = out.logits[r, offset:offset + len(ids)]
                assert (got - single.logits[0]).abs().max().item() <= 1e-5, (arch, impl, i)
                n = sum(1 for t in labels[1:] if t != IGNORE_INDEX)
                total_loss += single.loss.item() * n
                total_tokens += n
                offset += len(ids)
    assert out.loss.item() == pytest.approx(total_loss / total_tokens, abs=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_pitfalls_are_real(arch):
    """position_ids alone, or a boolean mask under eager, let examples see each other."""
    examples = make_examples(sizes=(9, 11))
    features = packed_features(examples, [[0, 1]])
    ids, lengths = torch.tensor([features[0]["input_ids"]]), features[0]["lengths"]
    with torch.no_grad():
        for impl in ("sdpa", "eager"):
            model = tiny(arch, impl)
            reference = model(input_ids=torch.tensor([examples[1][0]])).logits[0]
            batch = PackedCollator(0, impl)(features)
            second = slice(lengths[0], sum(lengths))
            positions_only = model(input_ids=ids, position_ids=batch["position_ids"]).logits[0, second]
            assert (positions_only - reference).abs().max() > 1e-2
            if impl == "eager":
                boolean = block_causal_mask(segment_ids([lengths], ids.shape[1]))
                wrong = model(input_ids=ids, position_ids=batch["position_ids"], attention_mask=boolean).logits[0, second]
                assert (wrong - reference).abs().max() > 1e-2


def test_flash_layout_is_one_flat_row_with_restarting_positions():
    batch = PackedCollator(0, "flash_attention_2")(packed_features(make_examples(), ROWS))
    n = sum(len(e[0]) for e in make_examples())
    assert batch["input_ids"].shape == (1, n) and "attention_mask" not in batch
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) == 6 and starts[0] == 0
    lengths = [len(make_examples()[i][0]) for row in ROWS for i in row]
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == bounds  # flash-attn's varlen args
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == max(lengths) and isinstance(batch["max_length_q"], int)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["flash_attention_2", "sdpa"])
def test_packed_equals_one_by_one_on_the_gpu_in_bf16(impl):
    """Packed rows on CUDA in bf16 (flash-attn's varlen kernel, or lmforge's varlen sdpa) give the logits of the
    examples run one by one, within bf16's rounding."""
    import importlib.util

    from lmforge.model.varlen import use_varlen_sdpa

    if impl.startswith("flash") and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed")
    model, examples = tiny("llama", impl).to("cuda", torch.bfloat16), make_examples()
    layout = use_varlen_sdpa(model) if impl == "sdpa" else impl
    rows = [[0, 1, 2, 3, 4, 5]]
    batch = PackedCollator(0, layout)(packed_features(examples, rows))
    for key in COUNT_KEYS:
        batch.pop(key)
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    with torch.no_grad():
        out = model(**batch).logits[0].float()
        offset = 0
        for ids, _ in examples:
            single = model(input_ids=torch.tensor([ids], device="cuda")).logits[0].float()
            assert (out[offset:offset + len(ids)] - single).abs().max().item() <= 0.05, impl  # bf16 rounding
            offset += len(ids)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_right_padding_needs_no_mask_under_causal_attention(arch):
    """Dropping the padding mask changes nothing at real positions: loss, logits, gradients."""
    from lmforge.data.collator import PaddingCollator, drop_redundant_mask

    examples = make_examples(sizes=(5, 11, 8))
    features = [{"input_ids": ids, "labels": labels} for ids, labels in examples]
    results = []
    for causal_only in (False, True):
        model = tiny(arch, "sdpa").train()
        batch = PaddingCollator(0, causal_mask_only=causal_only)(features)
        for key in COUNT_KEYS:
            batch.pop(key)
        assert batch["attention_mask"].sum().item() == sum(len(e[0]) for e in examples)
        batch = drop_redundant_mask(batch)
        assert ("attention_mask" in batch) is not causal_only
        out = model(**batch)
        out.loss.backward()
        results.append((out, [p.grad.clone() for p in model.parameters()]))
    (masked, grads_masked), (causal, grads_causal) = results
    real = torch.tensor([[i < len(e[0]) for i in range(11)] for e in examples])
    assert causal.loss.item() == pytest.approx(masked.loss.item(), abs=1e-6)
    assert (causal.logits[real] - masked.logits[real]).abs().max() <= 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(grads_masked, grads_causal)) <= 1e-5


def flat_reference(model, examples):
    """Per-example logits and the token-weighted loss of the examples run one by one."""
    logits, total_loss, total_tokens = [], 0.0, 0
    for ids, labels in examples:
        single = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
        logits.append(single.logits[0])
        n = sum(1 for t in labels[1:] if t != IGNORE_INDEX)
        total_loss, total_tokens = total_loss + single.loss * n, total_tokens + n
    return torch.cat(logits), total_loss / total_tokens


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_varlen_sdpa_equals_one_by_one_logits_loss_and_gradients(arch):
    """sdpa packing as `train` runs it: one causal call per example on a flattened row."""
    from lmforge.data.collator import VARLEN_SDPA
    from lmforge.model.varlen import use_varlen_sdpa

    examples = make_examples()
    order = [i for row in ROWS for i in row]
    model = tiny(arch, "sdpa").train()
    ref_logits, ref_loss = flat_reference(model, [examples[i] for i in order])
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    assert use_varlen_sdpa(model) == VARLEN_SDPA
    batch = PackedCollator(0, VARLEN_SDPA)(packed_features(examples, ROWS))
    assert batch["cu_seq_lens_q"].tolist() == [0, 7, 19, 22, 27, 36, 50]
    for key in COUNT_KEYS:
        batch.pop(key)
    out = model(**batch)
    out.loss.backward()
    assert out.logits.shape[:2] == (1, 50)
    assert (out.logits[0] - ref_logits).abs().max().item() <= 1e-5
    assert out.loss.item() == pytest.approx(ref_loss.item(), abs=1e-6)
    assert max((p.grad - ref_grads[n]).abs().max().item() for n, p in model.named_parameters()) <= 1e-5
    with torch.no_grad():  # an unpacked batch (no boundaries) still runs as plain sdpa
        single = model(input_ids=torch.tensor([examples[0][0]])).logits[0]
    assert (single - ref_logits[:7]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch, window", [
    ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 0}),  # set on the module
    ("mistral", {"sliding_window": 4}),  # Mistral and Mixtral pass it to the attention function
    ("mixtral", {"sliding_window": 4}),
])
def test_varlen_sdpa_keeps_a_sliding_window_inside_an_example(arch, window):
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmforge.data.collator import VARLEN_SDPA
    from lmforge.model.varlen import use_varlen_sdpa

    config = AutoConfig.for_model(arch, vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                  **window)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()
    examples = make_examples(sizes=(12, 3, 9))
    with torch.no_grad():
        ref_logits, _ = flat_reference(model, examples)
        use_varlen_sdpa(model)
        batch = PackedCollator(0, VARLEN_SDPA)(packed_features(examples, [[0, 1, 2]]))
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       cu_seq_lens_q=batch["cu_seq_lens_q"]).logits[0]
    assert (logits - ref_logits).abs().max().item() <= 1e-5


def test_varlen_falls_back_to_the_block_mask_where_attention_cannot_be_swapped(monkeypatch):
    """transformers only warns for such a model; a flattened row without a mask would mix its examples."""
    from lmforge.model.varlen import use_varlen_sdpa

    model = tiny("llama", "sdpa")
    monkeypatch.setattr(type(model), "_can_set_attn_implementation", classmethod(lambda cls: False))
    assert use_varlen_sdpa(model) == "sdpa"
    assert model.config._attn_implementation == "sdpa"


def test_varlen_attention_reads_the_collators_host_lengths_not_the_device():
    """With the collator's host copy no layer reads cu_seq_lens_q back from the device (a CUDA sync per layer,
    again in gradient checkpointing's recompute): a meta tensor, which cannot be read, proves it is not read."""
    from lmforge.model.varlen import example_lengths

    unreadable = torch.empty(4, dtype=torch.long, device="meta")
    assert example_lengths(unreadable, (3, 5, 2), 10) == [3, 5, 2]
    bounds = torch.tensor([0, 3, 8, 10])
    assert example_lengths(bounds, None, 10) == [3, 5, 2]
    assert example_lengths(bounds, (4, 4), 10) == [3, 5, 2]  # a copy that does not cover the row is not trusted
    examples = [([1, 2, 3], [1, 2, 3]), ([4, 5], [4, 5])]
    batch = PackedCollator(0, "lmforge_varlen_sdpa")(packed_features(examples, [[0, 1]]))
    assert batch["example_lengths"] == (3, 2) and batch["cu_seq_lens_q"].tolist() == [0, 3, 5]


def test_grouped_query_heads_use_sdpas_grouping_only_without_a_mask():
    from lmforge.model.varlen import grouped_heads

    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    key, value, gqa = grouped_heads(q, k, v, None)
    assert gqa and key is k and value is v
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    key, value, gqa = grouped_heads(q, k, v, mask)  # a masked call: CUDA's kernels would fall back to math
    assert not gqa and key.shape == (1, 4, 5, 8) and torch.equal(key[:, 1], k[:, 0]) and torch.equal(key[:, 2], k[:, 1])
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert torch.allclose(out, ref, atol=1e-6)
    assert grouped_heads(q, q, q, mask)[2] is False  # no grouping: nothing to repeat
