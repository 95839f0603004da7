"""Exact labels for sft (which tokens are trained) and pt blocks."""

import pytest

from lmforge.data.processors import (DROPPED, IGNORE_INDEX, KEPT, TRUNCATED, MaskPolicy, encode_pt_batch,
                                     encode_sft_batch)
from lmforge.data.templates import get_template

TURNS = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "2+2 is 4."},
]


def encode(tokenizer, system, turns, cutoff=1024, **policy):
    out = encode_sft_batch({"_system": [system], "_messages": [turns]}, tokenizer, get_template("smollm2", tokenizer),
                           MaskPolicy(cutoff, **policy))
    return out["input_ids"][0], out["labels"][0], out["_status"][0]


def trained_runs(tokenizer, labels):
    """Decoded text of each contiguous run of trained tokens."""
    runs, current = [], []
    for label in labels + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("system", ["", "You are terse."])
def test_single_turn_trains_exactly_the_reply_and_end_token(smol_tokenizer, system):
    input_ids, labels, status = encode(smol_tokenizer, system, TURNS[:2])
    template = get_template("smollm2", smol_tokenizer)
    prompt = ids(smol_tokenizer, template.render_prompt(system, TURNS[:1]))
    reply = ids(smol_tokenizer, "Hello! How can I help?<|im_end|>")
    assert status == KEPT
    assert input_ids == prompt + reply + ids(smol_tokenizer, "\n")
    assert labels == [IGNORE_INDEX] * len(prompt) + reply + [IGNORE_INDEX]


@pytest.mark.parametrize("system", ["", "You are terse."])
def test_multi_turn_trains_every_reply(smol_tokenizer, system):
    _, labels, _ = encode(smol_tokenizer, system, TURNS)
    assert trained_runs(smol_tokenizer, labels) == ["Hello! How can I help?<|im_end|>", "2+2 is 4.<|im_end|>"]


def test_mask_history_trains_only_the_last_reply(smol_tokenizer):
    _, labels, _ = encode(smol_tokenizer, "", TURNS, mask_history=True)
    assert trained_runs(smol_tokenizer, labels) == ["2+2 is 4.<|im_end|>"]


def test_train_on_prompt_trains_everything(smol_tokenizer):
    input_ids, labels, _ = encode(smol_tokenizer, "Sys", TURNS, train_on_prompt=True)
    assert labels == input_ids


def test_cutoff_keeps_whole_turns(smol_tokenizer):
    full_ids, _, _ = encode(smol_tokenizer, "", TURNS)
    first_turn_ids, first_labels, _ = encode(smol_tokenizer, "", TURNS[:2])
    input_ids, labels, status = encode(smol_tokenizer, "", TURNS, cutoff=len(full_ids) - 1)
    assert status == TRUNCATED
    assert input_ids == first_turn_ids and labels == first_labels
    assert trained_runs(smol_tokenizer, labels) == ["Hello! How can I help?<|im_end|>"]


def test_cutoff_inside_first_reply_cuts_the_reply_not_the_prompt(smol_tokenizer):
    prompt_len = len(ids(smol_tokenizer, get_template("smollm2", smol_tokenizer).render_prompt("", TURNS[:1])))
    input_ids, labels, status = encode(smol_tokenizer, "", TURNS, cutoff=prompt_len + 2)
    assert status == TRUNCATED and len(input_ids) == prompt_len + 2
    assert trained_runs(smol_tokenizer, labels) == [smol_tokenizer.decode(input_ids[prompt_len:])]
    assert "<|im_end|>" not in trained_runs(smol_tokenizer, labels)[0]


def test_prompt_longer_than_cutoff_drops_the_example(smol_tokenizer):
    assert encode(smol_tokenizer, "", TURNS, cutoff=5)[2] == DROPPED


def test_pt_blocks_have_bos_and_eos_around_each_document(smol_tokenizer):
    docs = ["The bond market moved.", "Rates rose again today, and the yield curve flattened further."]
    bos, eos = smol_tokenizer.bos_token_id, smol_tokenizer.eos_token_id
    stream = [t for d in docs for t in [bos, *ids(smol_tokenizer, d), eos]]
    out = encode_pt_batch({"_text": docs}, smol_tokenizer, block_size=8)
    n_blocks = len(stream) // 8
    assert out["input_ids"] == [stream[i * 8:(i + 1) * 8] for i in range(n_blocks)]
    assert out["labels"] == out["input_ids"]
    assert out["input_ids"][0][0] == bos
    flat = [t for b in out["input_ids"] for t in b]
    first_eos = len(ids(smol_tokenizer, docs[0])) + 1
    assert flat[first_eos] == eos and flat[first_eos + 1] == bos
