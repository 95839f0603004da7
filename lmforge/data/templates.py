"""Render conversations to text and mark, per character, which part is each turn's response.

Two renderers share one output (`Rendered`): a catalogue template (`templates.yaml`) and the
tokenizer's own Jinja `chat_template` (`template: auto`). Token labels are derived later from these
character spans after tokenizing the whole text once, so the ids always equal what
`tokenizer.apply_chat_template` would produce for the same text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
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
    eos_labels: tuple[int, ...] = ()  # efficient_eos templates: the token starting here is labelled EOS


class Renderer(Protocol):
    """What every chat template provides: render a conversation, or its prompt for generation."""
    name: str
    stop_words: tuple[str, ...]

    def render(self, system: str, messages: list[dict[str, str]], tools: str = "") -> Rendered: ...

    def render_prompt(self, system: str, messages: list[dict[str, str]], tools: str = "") -> str: ...


KINDS = ("base", "llama2", "reasoning", "glm47_reasoning")
THOUGHT_WORDS = ("<think>\n", "\n</think>\n\n")
SOURCE_ROLES = ("user", "observation")  # what opens a turn (the prompt)
TARGET_ROLES = ("assistant", "function")  # what answers it (trained)


@dataclass(frozen=True)
class TemplateSpec:
    """One catalogue entry, in LLaMA-Factory's terms (see templates.yaml for the meaning of each slot)."""

    name: str
    kind: str = "base"
    description: str = ""
    family: str = ""
    prefix: str = ""
    system: str = "{{content}}"
    user: str = "{{content}}"
    assistant: str = "{{content}}{{eos_token}}"
    function: str | None = None
    observation: str | None = None
    tool_format: str = "default"
    function_format: str | None = None
    tools: str | None = None  # a slot that takes the tools' JSON as it is, instead of tool_format's text
    default_system: str = ""
    stop_words: tuple[str, ...] = ()
    thought_words: tuple[str, str] = THOUGHT_WORDS
    tool_call_words: tuple[str, str] = ("<tool_call>", "</tool_call>")
    efficient_eos: bool = False
    replace_eos: bool = False
    replace_jinja_template: bool = False
    enable_thinking: bool | None = True
    multimodal: str | None = None
    strip_content: bool = False
    source: str = "llamafactory"
    official: str | None = None
    notes: str = ""

    @property
    def reasoning(self) -> bool:
        return self.kind in ("reasoning", "glm47_reasoning")

    @property
    def features(self) -> list[str]:
        """What the entry renders beyond plain turns: system, tools, reasoning, multimodal."""
        out = ["system"] if "{{content}}" in self.system else []
        if self.tool_format:
            out.append(f"tools:{self.function_format or self.tool_format}")
        if self.reasoning:
            out.append("reasoning")
        if self.multimodal:
            out.append(f"multimodal:{self.multimodal} (text only)")
        return out


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
        if entry.get("kind", "base") not in KINDS:
            raise ValueError(f"templates.yaml: template '{name}' has kind {entry['kind']!r}; known: {KINDS}")
        entry = dict(entry, **{k: tuple(entry[k]) for k in ("stop_words", "thought_words", "tool_call_words")
                               if k in entry})
        catalogue[name] = TemplateSpec(name=name, **entry)
    return catalogue


def template_names() -> list[str]:
    """The names `template` accepts: `auto` and every catalogue entry."""
    return ["auto", *load_catalogue()]


@dataclass(frozen=True)
class TemplateOptions:
    """The data options that change how a template renders (LLaMA-Factory's names)."""

    enable_thinking: bool | None = True
    preserve_thinking: bool = False
    tool_format: str | None = None
    default_system: str | None = None

    @classmethod
    def of(cls, args: Any) -> "TemplateOptions":
        return cls(**{f.name: getattr(args, f.name, f.default) for f in fields(cls)})


def _fill(slot: str, tokens: dict[str, str], **values: str) -> str:
    """A slot with BOS/EOS put in, then each {{name}} replaced once (content last, so it is never scanned)."""
    for key, value in tokens.items():
        slot = slot.replace(key, value)
    for key, value in values.items():
        if key != "content":
            slot = slot.replace("{{" + key + "}}", value, 1)
    before, found, after = slot.partition("{{content}}")
    return before + values.get("content", "") + after if found else slot


class CatalogueTemplate:
    """Renders with a `TemplateSpec` bound to a tokenizer's BOS/EOS, as LLaMA-Factory encodes: the first
    message opens with prefix and system (plus the tools' description), user and observation messages are
    prompts, assistant and function (tool-call) messages are the trained replies. Reasoning templates keep
    thoughts in the last reply and drop them from earlier ones, as the models' official templates do."""

    def __init__(self, spec: TemplateSpec, bos_token: str = "", eos_token: str = "",
                 options: TemplateOptions = TemplateOptions()):
        from lmforge.data.tools import get_tool_format

        self.spec = spec
        self.name = spec.name
        self.options = options
        if spec.replace_eos and spec.stop_words:
            eos_token = spec.stop_words[0]
        self.eos_token = eos_token or ""
        self.tokens = {"{{bos_token}}": bos_token or "", "{{eos_token}}": self.eos_token}
        self.stop_words = tuple(dict.fromkeys([*spec.stop_words, *([eos_token] if eos_token else [])]))
        tool_format = options.tool_format
        self.tools = get_tool_format(tool_format or spec.tool_format)
        self.calls = get_tool_format(tool_format or spec.function_format or spec.tool_format)
        self.default_system = spec.default_system if options.default_system is None else options.default_system
        self.enable_thinking = options.enable_thinking if spec.reasoning else None

    # ---- pieces -------------------------------------------------------------------------------------------
    def _content(self, text: str) -> str:
        return text.strip() if self.spec.strip_content else text

    def empty_thought(self) -> str:
        words = self.spec.thought_words
        return words[1] if self.spec.kind == "glm47_reasoning" else words[0] + words[1]

    def has_thought(self, content: str) -> bool:
        return any(word.strip() in content for word in self.spec.thought_words)

    def remove_thought(self, content: str) -> str:
        first, last = (re.escape(w) for w in self.spec.thought_words)
        return re.sub(f"{first}(.*?){last}", "", content, flags=re.DOTALL).lstrip("\n")

    def _system_text(self, system: str, tools: str) -> str:
        """The system message with the tools' description after it ('' when neither)."""
        from lmforge.data.tools import parse_tools

        tool_list = parse_tools(tools) if tools else []
        if tool_list and self.spec.tools:
            tool_text = _fill(self.spec.tools, self.tokens, content=tools)
        else:
            tool_text = self.tools.tool_text(tool_list) if tool_list else ""
        system = self._content(system or self.default_system)
        if not (system or tools):
            return ""
        return _fill(self.spec.system, self.tokens, content=system + tool_text)

    def _function_text(self, content: str) -> str:
        """A function message (JSON calls, maybe with a thought or tool-call words) in the template's call format."""
        from lmforge.data.tools import calls_from_json

        call_words, thought_words = self.spec.tool_call_words, self.spec.thought_words
        match = re.search(f"{re.escape(call_words[0])}(.*?){re.escape(call_words[1])}", content, re.DOTALL)
        if match:
            return content.replace(match.group(0), "") + self.calls.call_text(calls_from_json(match.group(1)))
        thought = re.search(f"{re.escape(thought_words[0])}(.*?){re.escape(thought_words[1])}", content, re.DOTALL)
        calls = calls_from_json(content.replace(thought.group(0), "") if thought else content)
        return (thought.group(0) if thought else "") + self.calls.call_text(calls)

    def _message(self, index: int, message: dict[str, str], inline_system: str) -> str:
        role, content = message["role"], message["content"]
        spec = self.spec
        if role == "user":
            return _fill(spec.user, self.tokens, content=inline_system + self._content(content), idx=str(index // 2))
        if role == "assistant":
            return _fill(spec.assistant, self.tokens, content=self._content(content))
        if role == "observation":
            return _fill(spec.observation or spec.user, self.tokens, content=inline_system + content,
                         idx=str(index // 2))
        if role == "function":
            return _fill(spec.function or spec.assistant, self.tokens, content=self._function_text(content))
        raise ValueError(f"unexpected role {role!r}")

    def _head(self, system: str, tools: str) -> tuple[str, str]:
        """(text before the first message, text put inside the first message: llama2-kind templates)."""
        head = _fill(self.spec.prefix, self.tokens)
        system_text = self._system_text(system, tools)
        return (head, system_text) if self.spec.kind == "llama2" else (head + system_text, "")

    def _thoughts(self, messages: list[dict[str, str]], for_prompt: bool) -> tuple[list[dict[str, str]], list[bool]]:
        """Reasoning templates: replies with thoughts removed where the official templates remove them, and per
        reply whether an empty thought goes in front of it (in the prompt when thinking is off: untrained)."""
        n = len(messages)
        replies = [i for i in range(n) if messages[i]["role"] in TARGET_ROLES]
        empty = [False] * n
        if not self.spec.reasoning:
            return messages, empty
        out = [dict(m) for m in messages]
        last = replies[-1] if replies and not for_prompt else None
        for i in replies:
            if self.enable_thinking is False or (i != last and not self.options.preserve_thinking):
                out[i]["content"] = self.remove_thought(out[i]["content"])
            if (i == last or (self.options.preserve_thinking and not for_prompt)) and \
                    not self.has_thought(out[i]["content"]):
                empty[i] = True
        return out, empty

    # ---- rendering ----------------------------------------------------------------------------------------
    def render(self, system: str, messages: list[dict[str, str]], tools: str = "", history: bool = False) -> Rendered:
        """The conversation as text with each turn's span; `history`: as the past of a generation prompt
        (reasoning templates drop the thoughts of every reply, and no EOS closes it)."""
        messages, empty = self._thoughts(messages, for_prompt=history)
        text, inline_system = self._head(system, tools)
        turns, eos_labels = [], []
        for i in range(0, len(messages) - 1, 2):
            start = 0 if i == 0 else len(text)
            if i and self.spec.efficient_eos:
                eos_labels.append(len(text))
            text += self._message(i, messages[i], inline_system if i == 0 else "")
            if empty[i + 1] and self.enable_thinking is False:  # thinking off: the empty block is prompt
                text += self.empty_thought()
            response_start = len(text)
            if empty[i + 1] and self.enable_thinking is not False:  # thinking on: it is learned
                text += self.empty_thought()
            text += self._message(i + 1, messages[i + 1], "")
            turns.append(Turn(start, response_start, len(text)))
        if self.spec.efficient_eos and turns and not history:
            text += self.eos_token
            turns[-1] = Turn(turns[-1].start, turns[-1].response_start, len(text))
        return Rendered(text, tuple(turns), tuple(eos_labels))

    def render_prompt(self, system: str, messages: list[dict[str, str]], tools: str = "") -> str:
        """The conversation so far (ending with a user or observation message) plus the generation prompt."""
        history, last = messages[:-1], messages[-1]
        text = self.render(system, history, tools, history=True).text if history else self._head(system, tools)[0]
        inline_system = "" if history else self._head(system, tools)[1]
        text += self._message(len(history), last, inline_system)
        if self.spec.reasoning and self.enable_thinking is False:
            text += self.empty_thought()
        return text

    def to_jinja(self) -> str:
        """The same format as a Jinja chat template, saved with the trained tokenizer."""
        return jinja_from_spec(self.spec, self)


def _jinja_slot(slot: str, tokens: dict[str, str], content_expr: str, idx_expr: str = "''") -> str:
    """A slot as a Jinja expression: literals, content and the bound BOS/EOS concatenated."""
    for key, value in tokens.items():
        slot = slot.replace(key, value)
    parts: list[str] = []
    rest = slot
    names = {"{{content}}": content_expr, "{{idx}}": idx_expr}
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
    return " + ".join(parts) if parts else "''"


def jinja_from_spec(spec: TemplateSpec, bound: CatalogueTemplate) -> str:
    """The Jinja chat template equivalent to a catalogue template for plain conversations (system, user and
    assistant messages), saved beside the model for other tools."""
    tokens = bound.tokens
    trim = " | trim" if spec.strip_content else ""
    default = json.dumps(bound.default_system)
    say = lambda expr: "{{- " + expr + " }}"  # noqa: E731
    out = [
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        "{%- set system = messages[0]['content']" + trim + " -%}{%- set loop_messages = messages[1:] -%}",
        "{%- else -%}{%- set system = " + default + trim + " -%}{%- set loop_messages = messages -%}{%- endif -%}",
        say(_jinja_slot(spec.prefix, tokens, "''")) if spec.prefix else "",
    ]
    if spec.kind != "llama2":
        out.append("{%- if system -%}" + say(_jinja_slot(spec.system, tokens, "system")) + "{%- endif -%}")
    # the reply that keeps its thought: the conversation's last message when it is the assistant's
    out.append("{%- set ns = namespace(last=-1) -%}{%- if loop_messages and loop_messages[-1]['role'] == 'assistant' -%}"
               "{%- set ns.last = loop_messages | length - 1 -%}{%- endif -%}")
    out.append("{%- for message in loop_messages -%}")
    out.append("{%- set content = message['content']" + trim + " -%}")
    out.append("{%- if message['role'] == 'user' -%}")
    if spec.kind == "llama2":
        out.append("{%- if loop.first and system -%}{%- set content = " + _jinja_slot(spec.system, tokens, "system")
                   + " + content -%}{%- endif -%}")
    out.append(say(_jinja_slot(spec.user, tokens, "content", "(loop.index0 // 2) | string")))
    out.append("{%- elif message['role'] == 'assistant' -%}")
    if spec.reasoning:
        first, last = (json.dumps(w) for w in spec.thought_words)
        last_strip = json.dumps(spec.thought_words[1].strip())
        keep = "loop.index0 == ns.last" + (" and false" if bound.enable_thinking is False else "")
        if bound.options.preserve_thinking and bound.enable_thinking is not False:
            keep = "true"
        out.append("{%- if not (" + keep + ") and " + last_strip + " in content -%}"
                   "{%- set content = (content.split(" + last + ")[-1] if " + first + " in content else content)"
                   ".lstrip('\n') -%}{%- endif -%}")
        out.append("{%- if loop.index0 == ns.last and " + last_strip + " not in content -%}"
                   + "{{- " + json.dumps(bound.empty_thought()) + " }}{%- endif -%}")  # before the whole reply
    out.append(say(_jinja_slot(spec.assistant, tokens, "content")))
    out.append("{%- endif -%}{%- endfor -%}")
    if spec.efficient_eos and bound.eos_token:
        out.append("{%- if loop_messages and loop_messages[-1]['role'] == 'assistant' -%}"
                   + say(json.dumps(bound.eos_token)) + "{%- endif -%}")
    if spec.reasoning and bound.enable_thinking is False:
        out.append("{%- if add_generation_prompt -%}" + say(json.dumps(bound.empty_thought())) + "{%- endif -%}")
    return "".join(out)


class TokenizerTemplate:
    """`template: auto`: the tokenizer's own chat_template, with response spans found by rendering
    each conversation prefix (prompt with generation prompt, then prompt plus reply)."""

    name = "auto"

    def __init__(self, tokenizer: Any, options: TemplateOptions = TemplateOptions()):
        self.options = options
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

    def _apply(self, messages: list[dict[str, str]], generation: bool, tools: str = "") -> str:
        from lmforge.data.tools import parse_tools

        extra = {"tools": parse_tools(tools)} if tools else {}
        if self.options.enable_thinking is not None:
            extra["enable_thinking"] = self.options.enable_thinking
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation, **extra)

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

    def render(self, system: str, messages: list[dict[str, str]], tools: str = "") -> Rendered:
        if any(m["role"] not in ("user", "assistant") for m in messages):
            raise LmforgeError("template auto renders user and assistant messages only: for tool calls "
                               "(function/observation turns) set `template` to the model's catalogue template")
        msgs = ([{"role": "system", "content": system}] if system else []) + messages
        full = self._apply(msgs, generation=False, tools=tools)
        turns, start = [], 0
        for j, message in enumerate(msgs):
            if message["role"] != "assistant":
                continue
            prompt = self._apply(msgs[:j], generation=True, tools=tools)
            upto = self._apply(msgs[: j + 1], generation=False, tools=tools)
            if not (full.startswith(prompt) and full.startswith(upto) and upto.startswith(prompt)):
                raise LmforgeError(
                    "the tokenizer's chat_template renders earlier turns differently once later turns follow, "
                    "so the trained tokens cannot be located: set `template` to a catalogue template"
                )
            content = message["content"].strip()
            pos = upto.find(content, len(prompt)) if content else len(prompt)
            if pos < 0:
                raise LmforgeError("the tokenizer's chat_template changes assistant text; set `template` explicitly")
            end = self._end_of_reply(upto, pos + len(content))
            if not upto[end:].strip():  # the turn's own suffix (the "\n" after <|im_end|>) is trained too
                end = len(upto)
            turns.append(Turn(start, len(prompt), end))
            start = turns[-1].response_end
        return Rendered(full, tuple(turns))

    def render_prompt(self, system: str, messages: list[dict[str, str]], tools: str = "") -> str:
        msgs = ([{"role": "system", "content": system}] if system else []) + messages
        return self._apply(msgs, generation=True, tools=tools)


def get_template(name: str, tokenizer: Any, options: TemplateOptions = TemplateOptions()) -> Renderer:
    """A renderer for `template: name` bound to this tokenizer."""
    if name == "auto":
        return TokenizerTemplate(tokenizer, options)
    catalogue = load_catalogue()
    if name not in catalogue:
        import difflib

        near = difflib.get_close_matches(name, list(catalogue), n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(near)}? " if near else ""
        raise LmforgeError(f"unknown template '{name}': {hint}`lmforge templates` lists all {len(catalogue) + 1} "
                           "(auto: the tokenizer's own chat template)")
    return CatalogueTemplate(catalogue[name], tokenizer.bos_token or "", tokenizer.eos_token or "", options)


def template_for(args: Any, tokenizer: Any, name: str | None = None) -> Renderer:
    """The template an options group names (`template`, or `name`), with its thinking and tool options."""
    return get_template(name or args.template, tokenizer, TemplateOptions.of(args))


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


MARKER = re.compile(r"<\|[^|<>\s]+\|>|<｜[^｜]+｜>")  # <|im_start|>, <｜Assistant｜>: special tokens by convention


def template_markers(template: Renderer) -> list[str]:
    """The pieces of a catalogue template that its model has as single tokens: <|...|>-style markers in its
    slots, and its first stop word when it looks like a token (<...>). Later stop words are extra stops that
    older tokenizers may lack (Llama-3.0 has no <|eom_id|>); a stop word that is no single token is skipped."""
    spec = getattr(template, "spec", None)
    if spec is None:
        return []
    slots = " ".join(x or "" for x in (spec.prefix, spec.system, spec.user, spec.assistant, spec.function,
                                        spec.observation))
    found = MARKER.findall(slots)
    found += [w for w in spec.stop_words[:1] if re.fullmatch(r"<[^<>\s]+>", w)]
    return list(dict.fromkeys(found))


def missing_markers(template: Renderer, tokenizer: Any) -> list[str]:
    """The template's markers that the tokenizer would split into several pieces."""
    return [m for m in template_markers(template)
            if len(tokenizer(m, add_special_tokens=False)["input_ids"]) != 1]


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
    return partial(encode, template=template_for(args, tokenizer), cutoff_len=args.cutoff_len)
