"""Exact labels for sft (which tokens are trained) and pt blocks."""

import pytest

from lmforge.data.processors import (
    IGNORE_INDEX,
    MaskPolicy,
    Status,
    encode_pt_batch,
    encode_pt_documents,
    encode_sft_batch,
)
from lmforge.data.templates import get_template

TURNS = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "2+2 is 4."},
]
# smollm2's literal text for TURNS: its default system prompt, the first question, the generation prompt
SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
FIRST_PROMPT = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
FIRST_REPLY = "Hello! How can I help?<|im_end|>"


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


@pytest.mark.parametrize("system, head", [("", SMOL_SYSTEM),
                                          ("You are terse.", "<|im_start|>system\nYou are terse.<|im_end|>\n")])
def test_single_turn_trains_exactly_the_reply_and_end_token(smol_tokenizer, system, head):
    input_ids, labels, status = encode(smol_tokenizer, system, TURNS[:2])
    prompt = ids(smol_tokenizer, head + FIRST_PROMPT)
    reply = ids(smol_tokenizer, FIRST_REPLY)
    assert status == Status.KEPT
    newline = ids(smol_tokenizer, "\n")  # the turn's own suffix is trained too, as in LLaMA-Factory
    assert input_ids == prompt + reply + newline
    assert labels == [IGNORE_INDEX] * len(prompt) + reply + newline


@pytest.mark.parametrize("system", ["", "You are terse."])
def test_multi_turn_trains_every_reply(smol_tokenizer, system):
    _, labels, _ = encode(smol_tokenizer, system, TURNS)
    assert trained_runs(smol_tokenizer, labels) == ["Hello! How can I help?<|im_end|>\n", "2+2 is 4.<|im_end|>\n"]


def test_mask_history_trains_only_the_last_reply(smol_tokenizer):
    _, labels, _ = encode(smol_tokenizer, "", TURNS, mask_history=True)
    assert trained_runs(smol_tokenizer, labels) == ["2+2 is 4.<|im_end|>\n"]


def test_train_on_prompt_trains_everything(smol_tokenizer):
    input_ids, labels, _ = encode(smol_tokenizer, "Sys", TURNS, train_on_prompt=True)
    assert labels == input_ids


def test_cutoff_keeps_whole_turns(smol_tokenizer):
    first_turn = SMOL_SYSTEM + FIRST_PROMPT + FIRST_REPLY + "\n"
    second_turn = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n2+2 is 4.<|im_end|>\n"
    cutoff = len(ids(smol_tokenizer, first_turn + second_turn)) - 1
    input_ids, labels, status = encode(smol_tokenizer, "", TURNS, cutoff=cutoff)
    prompt, reply = ids(smol_tokenizer, SMOL_SYSTEM + FIRST_PROMPT), ids(smol_tokenizer, FIRST_REPLY)
    assert status == Status.TRUNCATED
    assert input_ids == ids(smol_tokenizer, first_turn)
    assert labels == [IGNORE_INDEX] * len(prompt) + reply + ids(smol_tokenizer, "\n")


def test_cutoff_inside_first_reply_cuts_the_reply_not_the_prompt(smol_tokenizer):
    prompt = ids(smol_tokenizer, SMOL_SYSTEM + FIRST_PROMPT)
    input_ids, labels, status = encode(smol_tokenizer, "", TURNS, cutoff=len(prompt) + 2)
    reply_start = ids(smol_tokenizer, FIRST_REPLY)[:2]  # "Hello", "!": the end token is cut off
    assert status == Status.TRUNCATED
    assert input_ids == prompt + reply_start
    assert labels == [IGNORE_INDEX] * len(prompt) + reply_start
    assert trained_runs(smol_tokenizer, labels) == ["Hello!"]


def test_prompt_longer_than_cutoff_drops_the_example(smol_tokenizer):
    assert encode(smol_tokenizer, "", TURNS, cutoff=5)[2] == Status.DROPPED


def test_pt_blocks_have_bos_and_eos_around_each_document(smol_tokenizer):
    """BOS (1) doc EOS (2) per document, concatenated; the last 6 of 22 tokens do not fill a block."""
    docs = ["The bond market moved.", "Rates rose again today, and the yield curve flattened further."]
    assert ids(smol_tokenizer, docs[0]) == [504, 4436, 2342, 4935, 30]
    assert ids(smol_tokenizer, docs[1]) == [66, 660, 8739, 1163, 1834, 28, 284, 260, 5450, 8750, 30591, 2030, 30]
    out = encode_pt_batch({"_text": docs}, smol_tokenizer, block_size=8)
    assert out["input_ids"] == [[1, 504, 4436, 2342, 4935, 30, 2, 1], [66, 660, 8739, 1163, 1834, 28, 284, 260]]
    assert out["labels"] == out["input_ids"]
    assert out["attention_mask"] == [[1] * 8, [1] * 8]
    assert (out["_status"], out["_loss_tokens"]) == ([Status.KEPT, Status.KEPT], [8, 8])


def test_pt_documents_for_packing_are_split_never_joined(smol_tokenizer):
    """With packing each document (BOS doc EOS) is cut into pieces of at most block_size; a 1-token tail is dropped."""
    docs = ["The bond market moved.", "Rates rose again today, and the yield curve flattened further.", "Rates rose."]
    out = encode_pt_documents({"_text": docs}, smol_tokenizer, block_size=8)
    assert ids(smol_tokenizer, docs[2]) == [66, 660, 8739, 30]
    assert out["input_ids"] == [[1, 504, 4436, 2342, 4935, 30, 2], [1, 66, 660, 8739, 1163, 1834, 28, 284],
                                [260, 5450, 8750, 30591, 2030, 30, 2], [1, 66, 660, 8739, 30, 2]]
    assert out["_loss_tokens"] == [7, 8, 7, 6]
    short = encode_pt_documents({"_text": ["The bond market moved."]}, smol_tokenizer, block_size=6)
    assert short["input_ids"] == [[1, 504, 4436, 2342, 4935, 30]]  # the lone EOS left over is not a piece
