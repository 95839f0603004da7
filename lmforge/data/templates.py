"""Render conversations to text and mark, per character, which part is each turn's response.

Two renderers share one output (`Rendered`): a catalogue template (`templates.yaml`) and the
tokenizer's own Jinja `chat_template` (`template: auto`). Token labels are derived later from these
character spans after tokenizing the whole text once, so the ids always equal what
`tokenizer.apply_chat_template` would produce for the same text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Protocol

import yaml

from lmforge.errors import LmforgeError

CATALOGUE_PATH = Path(__file__).with_name("templates.yaml")


@dataclass(frozen=True)
class Turn:
    """Character offsets of one user->assistant exchange: [start, response_start) is the prompt,
    [response_start, response_end) what the model learns to say."""

    start: int
    response_start: int
    response_end: int


@dataclass(frozen=True)
class Rendered:
    """A conversation rendered to text, with the character span of each turn, to label tokens by turn."""
    text: str
    turns: tuple[Turn, ...]


class Renderer(Protocol):
    """What every chat template provides: render a conversation, or its prompt for generation."""
    name: str
    stop_words: tuple[str, ...]

    def render(self, system: str, messages: list[dict[str, str]]) -> Rendered: ...

    def render_prompt(self, system: str, messages: list[dict[str, str]]) -> str: ...


@dataclass(frozen=True)
class TemplateSpec:
    """One catalogue entry (see templates.yaml for the meaning of each slot)."""

    name: str
    description: str = ""
    prefix: str = ""
    system: str = "{content}"
    system_in_user: bool = False
    default_system: str = ""
    user: str = "{content}"
    assistant_prefix: str = ""
    assistant: str = "{content}"
    assistant_suffix: str = ""
    strip_content: bool = False
    stop_words: tuple[str, ...] = field(default_factory=tuple)


@lru_cache(maxsize=1)
def load_catalogue() -> dict[str, TemplateSpec]:
    """Read templates.yaml into TemplateSpecs, refusing unknown slots."""
    raw = yaml.safe_load(CATALOGUE_PATH.read_text(encoding="utf-8"))
    known = {f.name for f in fields(TemplateSpec)}
    catalogue = {}
    for name, entry in raw.items():
        unknown = set(entry) - known
        if unknown:
            raise ValueError(f"templates.yaml: template '{name}' has unknown slots {sorted(unknown)}")
        entry = dict(entry, stop_words=tuple(entry.get("stop_words", ())))
        catalogue[name] = TemplateSpec(name=name, **entry)
    return catalogue


def template_names() -> list[str]:
    """The names `template` accepts: `auto` and every catalogue entry."""
    return ["auto", *load_catalogue()]


class CatalogueTemplate:
    """Renders with a `TemplateSpec`, bound to a tokenizer's BOS/EOS strings."""

    def __init__(self, spec: TemplateSpec, bos_token: str = "", eos_token: str = ""):
        self.spec = spec
        self.name = spec.name
        self.tokens = {"{bos_token}": bos_token or "", "{eos_token}": eos_token or ""}
        self.stop_words = tuple(dict.fromkeys([*spec.stop_words, *([eos_token] if eos_token else [])]))

    def _fill(self, slot: str, content: str = "") -> str:
        for key, value in self.tokens.items():
            slot = slot.replace(key, value)
        return slot.replace("{content}", content)

    def _content(self, text: str) -> str:
        return text.strip() if self.spec.strip_content else text

    def _head(self, system: str) -> tuple[str, str]:
        """(text before the first user message, text to put inside the first user message)."""
        system = self._content(system or self.spec.default_system)
        head = self._fill(self.spec.prefix)
        if not system:
            return head, ""
        if self.spec.system_in_user:
            return head, self._fill(self.spec.system, system)
        return head + self._fill(self.spec.system, system), ""

    def render(self, system: str, messages: list[dict[str, str]]) -> Rendered:
        text, inline_system = self._head(system)
        turns = []
        for i in range(0, len(messages) - 1, 2):
            start = 0 if i == 0 else len(text)
            user = self._content(messages[i]["content"])
            text += self._fill(self.spec.user, (inline_system if i == 0 else "") + user)
            text += self._fill(self.spec.assistant_prefix)
            response_start = len(text)
            text += self._fill(self.spec.assistant, self._content(messages[i + 1]["content"]))
            turns.append(Turn(start, response_start, len(text)))
            text += self._fill(self.spec.assistant_suffix)
        return Rendered(text, tuple(turns))

    def render_prompt(self, system: str, messages: list[dict[str, str]]) -> str:
        """The conversation so far (ending with a user message) plus the generation prompt."""
        history, last = messages[:-1], messages[-1]["content"]
        text = self.render(system, history).text if history else self._head(system)[0]
        inline_system = "" if history else self._head(system)[1]
        return text + self._fill(self.spec.user, inline_system + self._content(last)) + self._fill(self.spec.assistant_prefix)

    def to_jinja(self) -> str:
        """The same format as a Jinja chat template, saved with the trained tokenizer."""
        return jinja_from_spec(self.spec)


def _jinja_slot(slot: str, content_expr: str) -> str:
    """A slot string as a Jinja expression: literals, content and special tokens concatenated."""
    parts: list[str] = []
    rest = slot
    names = {"{content}": content_expr, "{bos_token}": "bos_token", "{eos_token}": "eos_token"}
    while rest:
        hits = [(rest.find(k), k) for k in names if k in rest]
        if not hits:
            parts.append(json.dumps(rest))
            break
        pos, key = min(hits)
        if pos:
            parts.append(json.dumps(rest[:pos]))
        parts.append(names[key])
        rest = rest[pos + len(key):]
    return "{{- " + (" + ".join(parts) if parts else "''") + " }}"


def jinja_from_spec(spec: TemplateSpec) -> str:
    """The Jinja chat template equivalent to a TemplateSpec, saved beside the model for other tools."""
    trim = " | trim" if spec.strip_content else ""
    default = json.dumps(spec.default_system)
    out = [
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        "{%- set system = messages[0]['content']" + trim + " -%}{%- set loop_messages = messages[1:] -%}",
        "{%- else -%}{%- set system = " + default + trim + " -%}{%- set loop_messages = messages -%}{%- endif -%}",
        _jinja_slot(spec.prefix, "''") if spec.prefix else "",
    ]
    if not spec.system_in_user:
        out.append("{%- if system -%}" + _jinja_slot(spec.system, "system") + "{%- endif -%}")
    out.append("{%- for message in loop_messages -%}")
    out.append("{%- set content = message['content']" + trim + " -%}")
    out.append("{%- if message['role'] == 'user' -%}")
    if spec.system_in_user:
        out.append("{%- if loop.first and system -%}{%- set content = " + _jinja_expr(spec.system, "system") +
                   " + content -%}{%- endif -%}")
    out.append(_jinja_slot(spec.user, "content"))
    out.append("{%- elif message['role'] == 'assistant' -%}")
    out.append(_jinja_slot(spec.assistant_prefix + spec.assistant + spec.assistant_suffix, "content"))
    out.append("{%- endif -%}{%- endfor -%}")
    out.append("{%- if add_generation_prompt -%}" + _jinja_slot(spec.assistant_prefix, "''") + "{%- endif -%}")
    return "".join(out)


def _jinja_expr(slot: str, content_expr: str) -> str:
    return _jinja_slot(slot, content_expr)[4:-3]


class TokenizerTemplate:
    """`template: auto`: the tokenizer's own chat_template, with response spans found by rendering
    each conversation prefix (prompt with generation prompt, then prompt plus reply)."""

    name = "auto"

    def __init__(self, tokenizer: Any):
        if not getattr(tokenizer, "chat_template", None):
            raise LmforgeError(
                "template is auto but the tokenizer has no chat_template: set template to one of "
                + ", ".join(load_catalogue())
            )
        self.tokenizer = tokenizer
        special = {str(t) for t in getattr(tokenizer, "all_special_tokens", [])}
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        special |= {tok.content for tok in added.values() if getattr(tok, "special", False)}
        self.special_tokens = sorted((s for s in special if s), key=len, reverse=True)
        eos = tokenizer.eos_token
        self.stop_words = (eos,) if eos else ()

    def _apply(self, messages: list[dict[str, str]], generation: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    def _end_of_reply(self, text: str, content_end: int) -> int:
        """The reply's end marker (the first special token after it, whitespace allowed before)."""
        rest = text[content_end:]
        best = None
        for token in self.special_tokens:
            pos = rest.find(token)
            if pos >= 0 and not rest[:pos].strip() and (best is None or pos < best[0]):
                best = (pos, len(token))
        if best is None:
            return content_end
        return content_end + best[0] + best[1]

    def render(self, system: str, messages: list[dict[str, str]]) -> Rendered:
        msgs = ([{"role": "system", "content": system}] if system else []) + messages
        full = self._apply(msgs, generation=False)
        turns, start = [], 0
        for j, message in enumerate(msgs):
            if message["role"] != "assistant":
                continue
            prompt = self._apply(msgs[:j], generation=True)
            upto = self._apply(msgs[: j + 1], generation=False)
            if not (full.startswith(prompt) and full.startswith(upto) and upto.startswith(prompt)):
                raise LmforgeError(
                    "the tokenizer's chat_template renders earlier turns differently once later turns follow, "
                    "so the trained tokens cannot be located: set `template` to a catalogue template"
                )
            content = message["content"].strip()
            pos = upto.find(content, len(prompt)) if content else len(prompt)
            if pos < 0:
                raise LmforgeError("the tokenizer's chat_template changes assistant text; set `template` explicitly")
            turns.append(Turn(start, len(prompt), self._end_of_reply(upto, pos + len(content))))
            start = turns[-1].response_end
        return Rendered(full, tuple(turns))

    def render_prompt(self, system: str, messages: list[dict[str, str]]) -> str:
        msgs = ([{"role": "system", "content": system}] if system else []) + messages
        return self._apply(msgs, generation=True)


def get_template(name: str, tokenizer: Any) -> Renderer:
    """A renderer for `template: name` bound to this tokenizer."""
    if name == "auto":
        return TokenizerTemplate(tokenizer)
    catalogue = load_catalogue()
    if name not in catalogue:
        raise LmforgeError(f"unknown template '{name}'; known templates: {', '.join(template_names())}")
    return CatalogueTemplate(catalogue[name], tokenizer.bos_token or "", tokenizer.eos_token or "")


PROBE_CONVERSATIONS = (
    ("", [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}]),
    ("You are terse.", [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
                        {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6."}]),
)


def template_mismatch(template: Renderer, tokenizer: Any, chat_template: str | None,
                      conversations: Any = PROBE_CONVERSATIONS) -> str | None:
    """Where a catalogue template's text first differs from the tokenizer's own chat template (None: same)."""
    if not chat_template or not isinstance(template, CatalogueTemplate):
        return None
    for system, messages in conversations:
        msgs = ([{"role": "system", "content": system}] if system else []) + list(messages)
        try:
            theirs = tokenizer.apply_chat_template(msgs, tokenize=False, chat_template=chat_template)
        except Exception as err:  # a template that rejects the probe (e.g. no system role) is a difference too
            return f"the tokenizer's template cannot render it ({err})"
        ours = template.render(system, list(messages)).text
        if ours != theirs:
            at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            return f"at character {at}: template gives {ours[at:at + 40]!r}, the tokenizer's gives {theirs[at:at + 40]!r}"
    return None


def stop_token_ids(tokenizer: Any, template: Renderer) -> list[int]:
    """EOS plus every stop word that is a single token (e.g. <|im_end|>, <|eot_id|>)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for word in template.stop_words:
        encoded = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(encoded) == 1:
            ids.add(encoded[0])
    return sorted(ids)


def bind_template(encode: Any, args: Any, tokenizer: Any) -> Any:
    """`encode` with the data options' template and cutoff_len bound (the chat stages' tokenizers)."""
    return partial(encode, template=get_template(args.template, tokenizer), cutoff_len=args.cutoff_len)
