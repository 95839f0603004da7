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


CHATML_BODY = ("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
               "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n2+2 is 4.<|im_end|>\n")
CHATML_TERSE = "<|im_start|>system\nYou are terse.<|im_end|>\n"
# Catalogue templates bound to SmolLM2's tokenizer (bos <|im_start|>, eos <|im_end|>), written out by hand:
# name -> (text of ("You are terse.", TURNS), what ends each reply span, generation prompt for ("", TURNS[:1])).
# Every other entry is pinned by its LLaMA-Factory fixture (test_template_parity.py).
LITERAL = {
    "chatml": (CHATML_TERSE + CHATML_BODY, "<|im_end|>\n",
               "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"),
    "smollm2": (CHATML_TERSE + CHATML_BODY, "<|im_end|>\n",
                "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"),
    "qwen": (CHATML_TERSE + CHATML_BODY, "<|im_end|>\n",
             "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
             "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"),
    "llama3": ("<|im_start|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nHello! How can I help?<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n2+2 is 4.<|eot_id|>", "<|eot_id|>",
               "<|im_start|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "llama2": ("<|im_start|>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi there [/INST] Hello! How can I help? "
               "<|im_end|><|im_start|>[INST] What is 2+2? [/INST] 2+2 is 4. <|im_end|>", " <|im_end|>",
               "<|im_start|>[INST] Hi there [/INST]"),
    "mistral": ("<|im_start|>[INST] You are terse.\n\nHi there[/INST] Hello! How can I help?<|im_end|>"
                "[INST] What is 2+2?[/INST] 2+2 is 4.<|im_end|>", "<|im_end|>", "<|im_start|>[INST] Hi there[/INST]"),
    "gemma": ("<|im_start|><start_of_turn>user\nYou are terse.\n\nHi there<end_of_turn>\n<start_of_turn>model\n"
              "Hello! How can I help?<end_of_turn>\n<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n"
              "<start_of_turn>model\n2+2 is 4.<end_of_turn>\n", "<end_of_turn>\n",
              "<|im_start|><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n"),
    "default": ("System: You are terse.<|im_end|>\nHuman: Hi there<|im_end|>\nAssistant:Hello! How can I help?<|im_end|>\n"
                "Human: What is 2+2?<|im_end|>\nAssistant:2+2 is 4.<|im_end|>\n", "<|im_end|>\n",
                "Human: Hi there<|im_end|>\nAssistant:"),
    "baichuan2": ("You are terse.<reserved_106>Hi there<reserved_107>Hello! How can I help?<|im_end|>"
                  "<reserved_106>What is 2+2?<reserved_107>2+2 is 4.<|im_end|>", "<|im_end|>",
                  "<reserved_106>Hi there<reserved_107>"),
    "empty": ("You are terse.Hi thereHello! How can I help?What is 2+2?2+2 is 4.", "", "Hi there"),
}


@pytest.mark.parametrize("name", list(LITERAL))
def test_catalogue_renders_the_literal_text(smol_tokenizer, name):
    """Text, reply spans (the reply plus its end marker) and generation prompt, for the template and its Jinja form."""
    text, end, prompt = LITERAL[name]
    template = get_template(name, smol_tokenizer)
    rendered = template.render("You are terse.", TURNS)
    assert rendered.text == text
    pad = " " if name in ("llama2", "mistral") else ""
    assert [text[t.response_start:t.response_end] for t in rendered.turns] == [
        pad + "Hello! How can I help?" + end, pad + "2+2 is 4." + end]
    assert template.render_prompt("", TURNS[:1]) == prompt
    jinja = template.to_jinja()
    conversation = chat("You are terse.", TURNS)
    assert smol_tokenizer.apply_chat_template(conversation, tokenize=False, chat_template=jinja) == text
    assert smol_tokenizer.apply_chat_template(TURNS[:1], tokenize=False, add_generation_prompt=True,
                                              chat_template=jinja) == prompt


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
    assert replies == [m["content"] + "<|im_end|>\n" for m in turns if m["role"] == "assistant"]
    assert [(t.response_start, t.response_end) for t in auto.turns] == [(t.response_start, t.response_end) for t in cat.turns]


def test_unknown_template_suggests_the_nearest_names(smol_tokenizer):
    with pytest.raises(LmforgeError, match="unknown template 'qwen3_nothnk': did you mean qwen3_nothink"):
        get_template("qwen3_nothnk", smol_tokenizer)
    with pytest.raises(LmforgeError, match=r"unknown template 'xyzzy': `lmforge templates` lists all 123 \(auto: "):
        get_template("xyzzy", smol_tokenizer)
    assert {"default", "alpaca", "chatml", "qwen", "qwen3", "qwen3_nothink", "llama3", "llama2", "mistral", "gemma",
            "deepseekr1", "glm4", "baichuan2", "empty"} <= set(template_names())


def test_auto_without_chat_template_says_what_to_set(llama3_tokenizer):
    from copy import deepcopy

    tok = deepcopy(llama3_tokenizer)
    tok.chat_template = None
    with pytest.raises(LmforgeError, match="tokenizer has no chat_template: set template to one of"):
        get_template("auto", tok)


def test_templates_command_lists_kinds_features_and_parity(capsys):
    from lmforge.cli import main

    assert main(["templates"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{len(load_catalogue()) + 1} templates")
    rows = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert "reasoning" in rows["qwen3"] and "tools:qwen" in rows["qwen3"] and "LLaMA-Factory 0.9.5" in rows["qwen3"]
    assert "reasoning" not in rows["qwen3_nothink"]
    assert "official: Llama-2-chat" in rows["llama2"]
    assert "multimodal" in rows["qwen2_vl"]
    assert main(["templates", "qwen3"]) == 0
    assert "kind: 'reasoning'" in capsys.readouterr().out
