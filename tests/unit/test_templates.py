"""Catalogue templates against the tokenizers' own chat templates: text and token ids."""

import pytest

from lmforge.data.templates import CatalogueTemplate, get_template, load_catalogue, template_names
from lmforge.errors import LmforgeError

TURNS = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "2+2 is 4."},
]
CASES = [("", TURNS[:2]), ("", TURNS), ("You are terse.", TURNS[:2]), ("You are terse.", TURNS)]


def chat(system, turns):
    return ([{"role": "system", "content": system}] if system else []) + turns


def reference_ids(tokenizer, messages, **kwargs):
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def own_ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("system, turns", CASES)
@pytest.mark.parametrize("name, tokenizer_fixture", [("smollm2", "smol_tokenizer"), ("llama3", "llama3_tokenizer")])
def test_catalogue_matches_the_models_own_template(request, name, tokenizer_fixture, system, turns):
    """smollm2 vs the template inside SmolLM2's GGUF; llama3 vs Meta's Llama-3-Instruct template."""
    tokenizer = request.getfixturevalue(tokenizer_fixture)
    template = get_template(name, tokenizer)
    rendered = template.render(system, turns)
    assert rendered.text == tokenizer.apply_chat_template(chat(system, turns), tokenize=False)
    assert own_ids(tokenizer, rendered.text) == reference_ids(tokenizer, chat(system, turns))
    prompt = template.render_prompt(system, turns[:-1])
    assert prompt == tokenizer.apply_chat_template(chat(system, turns[:-1]), tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("system, turns", CASES[2:])
def test_chatml_matches_when_a_system_prompt_is_given(smol_tokenizer, system, turns):
    rendered = get_template("chatml", smol_tokenizer).render(system, turns)
    assert own_ids(smol_tokenizer, rendered.text) == reference_ids(smol_tokenizer, chat(system, turns))


@pytest.mark.parametrize("name", list(load_catalogue()))
def test_derived_jinja_renders_exactly_like_the_catalogue(smol_tokenizer, name):
    """The chat_template saved with a trained model reproduces the training format."""
    template = get_template(name, smol_tokenizer)
    assert isinstance(template, CatalogueTemplate)
    jinja = template.to_jinja()
    for system, turns in CASES:
        text = smol_tokenizer.apply_chat_template(chat(system, turns), tokenize=False, chat_template=jinja)
        assert text == template.render(system, turns).text, (name, system)
        prompt = smol_tokenizer.apply_chat_template(chat(system, turns[:-1]), tokenize=False,
                                                    add_generation_prompt=True, chat_template=jinja)
        assert prompt == template.render_prompt(system, turns[:-1]), (name, system)


@pytest.mark.parametrize("system, turns", CASES)
def test_auto_finds_the_same_reply_spans(smol_tokenizer, system, turns):
    auto = get_template("auto", smol_tokenizer).render(system, turns)
    cat = get_template("smollm2", smol_tokenizer).render(system, turns)
    assert auto.text == cat.text
    replies = [auto.text[t.response_start:t.response_end] for t in auto.turns]
    assert replies == [m["content"] + "<|im_end|>" for m in turns if m["role"] == "assistant"]
    assert [(t.response_start, t.response_end) for t in auto.turns] == [(t.response_start, t.response_end) for t in cat.turns]


def test_reply_spans_of_llama2_include_the_end_marker(smol_tokenizer):
    rendered = get_template("llama2", smol_tokenizer).render("Be kind.", TURNS)
    assert rendered.text.startswith("<s>[INST] <<SYS>>\nBe kind.\n<</SYS>>\n\nHi there [/INST]")
    assert [rendered.text[t.response_start:t.response_end] for t in rendered.turns] == [
        " Hello! How can I help? </s>", " 2+2 is 4. </s>"]


def test_unknown_template_lists_known_ones(smol_tokenizer):
    with pytest.raises(LmforgeError, match="unknown template 'qwen3'; known templates: auto, default, alpaca"):
        get_template("qwen3", smol_tokenizer)
    assert {"default", "alpaca", "chatml", "qwen", "llama3", "llama2", "mistral", "gemma", "baichuan2",
            "empty"} <= set(template_names())


def test_auto_without_chat_template_says_what_to_set(llama3_tokenizer):
    from copy import deepcopy

    tok = deepcopy(llama3_tokenizer)
    tok.chat_template = None
    with pytest.raises(LmforgeError, match="tokenizer has no chat_template: set template to one of"):
        get_template("auto", tok)
