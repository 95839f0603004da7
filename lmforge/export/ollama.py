"""An Ollama Modelfile for an exported .gguf: the catalogue template the model was trained with, written in
Ollama's Go-template syntax, its stop tokens and its default system prompt."""

from __future__ import annotations

import json
from typing import Any

from lmforge.data.templates import TemplateSpec, get_template, load_catalogue, template_mismatch
from lmforge.errors import LmforgeError

# Ollama renders .Messages one by one; `$last` marks the final message, after which a user turn is followed
# by the generation prompt and an assistant turn (a prefill) is left open.
RANGE = "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"


def training_template(tokenizer: Any, name: str | None) -> TemplateSpec:
    """The catalogue entry the model was trained with: `name`, or the one that renders exactly as the
    tokenizer's chat_template."""
    catalogue = load_catalogue()
    if name and name != "auto":
        return catalogue[name]
    for spec in catalogue.values():
        if template_mismatch(get_template(spec.name, tokenizer), tokenizer, tokenizer.chat_template) is None:
            return spec
    raise LmforgeError("export_ollama: the tokenizer's chat_template is none of the catalogue's, so it cannot be "
                       "written for Ollama: set --template to the one the model was trained with (lmforge "
                       f"templates lists them: {', '.join(catalogue)}), or drop export_ollama")


def _slot(slot: str, content: str, tokens: dict[str, str]) -> str:
    """A catalogue slot as Go-template text: {{content}} becomes an action, BOS/EOS their literal text."""
    for key, value in tokens.items():
        slot = slot.replace(key, value)
    return slot.replace("{{content}}", "{{ " + content + " }}").replace("{{idx}}", "{{ $i }}")


def go_template(spec: TemplateSpec, bos: str, eos: str, add_bos: bool) -> str:
    """The template as Ollama's TEMPLATE. The prefix's BOS is left out when llama.cpp adds BOS itself. A user
    message carries the reply's opening (the generation prompt), as the catalogue's user slot does."""
    tokens = {"{{bos_token}}": bos, "{{eos_token}}": eos}
    prefix = _slot(spec.prefix, "", tokens)
    if add_bos and bos and prefix.startswith(bos):
        prefix = prefix[len(bos):]
    user_before, _, user_after = _slot(spec.user, ".Content", tokens).partition("{{ .Content }}")
    reply_before, _, reply_after = _slot(spec.assistant, ".Content", tokens).partition("{{ .Content }}")
    if spec.kind == "llama2":  # the system prompt opens the first user message
        head = prefix + "{{ $system := .System }}"
        system = "{{ if $system }}" + _slot(spec.system, "$system", tokens) + '{{ $system = "" }}{{ end }}'
    else:
        head = prefix + "{{ if .System }}" + _slot(spec.system, ".System", tokens) + "{{ end }}"
        system = ""
    user = user_before + system + "{{ .Content }}" + user_after
    reply = reply_before + "{{ .Content }}" + ("{{ if not $last }}" + reply_after + "{{ end }}" if reply_after else "")
    return head + RANGE + '{{ if eq .Role "user" }}' + user + '{{ else if eq .Role "assistant" }}' + reply + \
        "{{ end }}{{ end }}"


def _triple_quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise LmforgeError(f'export_ollama: the {what} contains """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def modelfile_text(gguf_name: str, spec: TemplateSpec, tokenizer: Any, add_bos: bool) -> str:
    """The Modelfile: FROM the .gguf beside it, TEMPLATE, one PARAMETER stop per stop token, SYSTEM."""
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    lines = [f"FROM ./{gguf_name}",
             "TEMPLATE " + _triple_quoted(go_template(spec, bos, eos, add_bos), "chat template")]
    stops = get_template(spec.name, tokenizer).stop_words
    lines += [f"PARAMETER stop {json.dumps(word, ensure_ascii=False)}" for word in stops]
    if spec.default_system:
        lines.append("SYSTEM " + _triple_quoted(spec.default_system, "default system prompt"))
    return "\n".join(lines) + "\n"
