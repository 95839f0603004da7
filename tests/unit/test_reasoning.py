"""Reasoning templates (qwen3): thoughts kept in the last reply and removed from earlier ones as Qwen3's
official template renders, enable_thinking false (empty thought block in the untrained prompt),
preserve_thinking (LLaMA-Factory's keep-all), and the doctor marking thoughts apart."""

import pytest

from lmforge.data.doctor import highlight
from lmforge.data.processors import IGNORE_INDEX, MaskPolicy, encode_sft_batch
from lmforge.data.templates import TemplateOptions, get_template

TURNS = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"},
         {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "<think>\nadd again\n</think>\n\n6"}]
PLAIN = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
U1 = "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
U2 = "<|im_start|>user\n3+3?<|im_end|>\n<|im_start|>assistant\n"


def trained(tokenizer, messages, **options):
    template = get_template("qwen3", tokenizer, TemplateOptions(**options))
    out = encode_sft_batch({"_system": [""], "_messages": [messages]}, tokenizer, template, MaskPolicy(None))
    ids, labels = out["input_ids"][0], out["labels"][0]
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return tokenizer.decode(ids), runs


def test_the_last_reply_keeps_its_thought_and_earlier_ones_lose_theirs(smol_tokenizer):
    text, runs = trained(smol_tokenizer, TURNS)
    assert text == U1 + "4<|im_end|>\n" + U2 + "<think>\nadd again\n</think>\n\n6<|im_end|>\n"
    assert runs == ["4<|im_end|>\n", "<think>\nadd again\n</think>\n\n6<|im_end|>\n"]


def test_thinking_off_removes_thoughts_and_leaves_the_empty_block_untrained(smol_tokenizer):
    text, runs = trained(smol_tokenizer, TURNS, enable_thinking=False)
    assert text == U1 + "4<|im_end|>\n" + U2 + "<think>\n\n</think>\n\n6<|im_end|>\n"
    assert runs == ["4<|im_end|>\n", "6<|im_end|>\n"]


def test_a_reply_without_thought_gets_a_trained_empty_block(smol_tokenizer):
    text, runs = trained(smol_tokenizer, PLAIN)
    assert runs == ["<think>\n\n</think>\n\n4<|im_end|>\n"]


def test_preserve_thinking_keeps_every_thought_as_llamafactory_does(smol_tokenizer):
    text, runs = trained(smol_tokenizer, TURNS, preserve_thinking=True)
    assert runs == ["<think>\nadd\n</think>\n\n4<|im_end|>\n", "<think>\nadd again\n</think>\n\n6<|im_end|>\n"]


@pytest.mark.parametrize("thinking, tail", [(True, ""), (False, "<think>\n\n</think>\n\n")])
def test_the_generation_prompt_opens_the_reply_as_qwen3_does(smol_tokenizer, thinking, tail):
    template = get_template("qwen3", smol_tokenizer, TemplateOptions(enable_thinking=thinking))
    prompt = template.render_prompt("", TURNS[:3])
    assert prompt == U1 + "4<|im_end|>\n" + U2 + tail


def test_the_saved_jinja_renders_like_the_catalogue(smol_tokenizer):
    for options in (TemplateOptions(), TemplateOptions(enable_thinking=False)):
        template = get_template("qwen3", smol_tokenizer, options)
        jinja = template.to_jinja()
        for messages in (TURNS, PLAIN):
            assert smol_tokenizer.apply_chat_template(messages, tokenize=False, chat_template=jinja) == \
                template.render("", messages).text
        assert smol_tokenizer.apply_chat_template(TURNS[:3], tokenize=False, add_generation_prompt=True,
                                                  chat_template=jinja) == template.render_prompt("", TURNS[:3])


def test_the_doctor_marks_the_thought_apart_from_the_answer(smol_tokenizer):
    template = get_template("qwen3", smol_tokenizer)
    out = encode_sft_batch({"_system": [""], "_messages": [TURNS[:2]]}, smol_tokenizer, template, MaskPolicy(None))
    shown = highlight(smol_tokenizer, out["input_ids"][0], out["labels"][0], color=False,
                      thought_words=template.spec.thought_words)
    assert shown == U1 + "[[{{think: <think>\nadd\n</think>}}]][[\n\n4<|im_end|>\n]]"
