"""Convert alpaca, ShareGPT and OpenAI-messages rows to one shape: `_system` + `_messages`.

A conversation is valid when, after an optional system message, turns alternate user, assistant,
user, ... and every assistant turn has text. Trailing user turns (no target) are dropped.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import datasets

from lmforge.data.catalogue import DatasetSpec
from lmforge.data.loader import row_location
from lmforge.errors import LmforgeError

Converter = Callable[[dict[str, Any]], tuple[str, list[dict[str, str]]]]


class RowError(ValueError):
    """A problem with one row; the caller adds the row's location."""


def detect_formatting(spec: DatasetSpec, columns: list[str], stage: str) -> str:
    """The formatting a catalogue entry names, or one guessed from the column names."""
    if spec.formatting:
        return spec.formatting
    if stage == "pt" and "text" in columns:
        return "text"
    if "messages" in columns:
        return "openai"
    if "conversations" in columns:
        return "sharegpt"
    if "instruction" in columns or "output" in columns:
        return "alpaca"
    if "text" in columns:
        return "text"
    raise LmforgeError(
        f"dataset '{spec.name}': cannot tell its format from columns {columns}; expected instruction/output "
        f"(alpaca), conversations (sharegpt), messages (openai) or text; or describe it in dataset_info.json"
    )


def detect_turn_format(spec: DatasetSpec, present: list[str]) -> str:
    """The formatting of rows whose answer columns vary by stage (pairs, KTO rows, RL prompts): the one the
    catalogue names, else openai / sharegpt / alpaca from the columns, else `prompt` (a `prompt` column of
    text or messages, for which the spec keeps no formatting)."""
    formatting = spec.formatting or ("openai" if "messages" in present else "sharegpt" if "conversations" in present
                                     else "alpaca" if "instruction" in present else "prompt")
    spec.formatting = None if formatting == "prompt" else formatting
    return formatting


def split_system(messages: list[dict[str, str]], system: str = "") -> tuple[str, list[dict[str, str]]]:
    """(system, turns): a leading system message taken out of the turns; else `system` unchanged."""
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return system, messages


def require_columns(spec: DatasetSpec, needed: dict[str, str | None], present: list[str]) -> None:
    """Every mapped column must exist; say which mapping key to fix."""
    for key, column in needed.items():
        if column is not None and column not in present:
            raise LmforgeError(
                f"dataset '{spec.name}': column '{column}' (columns.{key}) not found; the file has {present}: "
                f"fix the `columns` mapping of '{spec.name}' in dataset_info.json"
            )


def _text(value: Any, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError(f"{what} must be a string, got {type(value).__name__}")
    return value


def alpaca_converter(spec: DatasetSpec, present: list[str]) -> Converter:
    """A converter from alpaca rows (instruction, input, output, history) to the shared turn columns."""
    cols = {k: spec.column(k) for k in ("prompt", "query", "response", "history", "system")}
    for key in ("query", "history", "system"):  # optional unless the catalogue maps them explicitly
        if key not in spec.columns:
            column = cols[key] or key
            cols[key] = column if column in present else None
    require_columns(spec, cols, present)

    def convert(row: dict[str, Any]) -> tuple[str, list[dict[str, str]]]:
        messages: list[dict[str, str]] = []
        history = row.get(cols["history"]) if cols["history"] else None
        for pair in history or []:
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise RowError("history must be a list of [user, assistant] pairs")
            messages += [{"role": "user", "content": _text(pair[0], "history")},
                         {"role": "assistant", "content": _text(pair[1], "history")}]
        prompt = _text(row.get(cols["prompt"]), cols["prompt"])
        query = _text(row.get(cols["query"]), cols["query"]) if cols["query"] else ""
        user = "\n".join(part for part in (prompt, query) if part)
        messages += [{"role": "user", "content": user},
                     {"role": "assistant", "content": _text(row.get(cols["response"]), cols["response"])}]
        system = _text(row.get(cols["system"]), cols["system"]) if cols["system"] else ""
        return system, messages

    return convert


def tool_calls_json(calls: Any) -> str:
    """OpenAI `tool_calls` -> the JSON list of {name, arguments} a function message holds (LLaMA-Factory's
    shape), with arguments given as JSON text parsed to an object."""
    out = []
    for call in calls if isinstance(calls, list) else []:
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or "name" not in function:
            raise RowError("each tool_calls entry needs a function with a name")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as err:
                raise RowError(f"tool call '{function['name']}': arguments are not valid JSON ({err.msg})") from None
        out.append({"name": function["name"], "arguments": arguments})
    if not out:
        raise RowError("tool_calls must be a non-empty list of calls")
    return json.dumps(out, ensure_ascii=False)


def sharegpt_converter(spec: DatasetSpec, present: list[str]) -> Converter:
    """A converter from sharegpt or openai message lists to the shared turn columns. Tool calls come as
    `function_call` turns (JSON {name, arguments}) or OpenAI assistant `tool_calls`; tool results as
    `observation` turns or OpenAI `tool` messages (consecutive ones joined, as LLaMA-Factory does)."""
    column = spec.columns.get("messages", "messages" if spec.formatting == "openai" else "conversations")
    system_column = spec.column("system")
    require_columns(spec, {"messages": column, "system": system_column}, present)
    tag = spec.tag
    roles = {tag("user_tag"): "user", tag("assistant_tag"): "assistant", tag("system_tag"): "system",
             tag("observation_tag"): "observation", tag("function_tag"): "function"}

    def convert(row: dict[str, Any]) -> tuple[str, list[dict[str, str]]]:
        turns = row.get(column)
        if not isinstance(turns, list) or not turns:
            raise RowError(f"'{column}' must be a non-empty list of messages")
        messages: list[dict[str, str]] = []
        for turn in turns:
            if not isinstance(turn, dict) or tag("role_tag") not in turn or (
                    tag("content_tag") not in turn and not turn.get("tool_calls")):
                raise RowError(f"each message needs '{tag('role_tag')}' and '{tag('content_tag')}' keys "
                               f"(set `tags` in dataset_info.json for other names)")
            role = turn[tag("role_tag")]
            if role not in roles:
                raise RowError(f"unknown role '{role}'; known: {', '.join(roles)} (map others with `tags`)")
            role = roles[role]
            if role == "assistant" and turn.get("tool_calls"):
                role, content = "function", tool_calls_json(turn["tool_calls"])
            else:
                content = _text(turn.get(tag("content_tag")), "message content")
            if role == "function":
                _check_calls(content)
            add_message(messages, role, content)
        return split_system(messages, _text(row.get(system_column), system_column) if system_column else "")

    return convert


def add_message(messages: list[dict[str, str]], role: str, content: str) -> None:
    """Append a message; a tool result right after another joins it, as LLaMA-Factory joins them."""
    if role == "observation" and messages and messages[-1]["role"] == "observation":
        messages[-1]["content"] += "\n</tool_response>\n<tool_response>\n" + content
    else:
        messages.append({"role": role, "content": content})


def _check_calls(content: str) -> None:
    from lmforge.data.tools import calls_from_json

    try:
        calls_from_json(_strip_call_wrapping(content))
    except ValueError as err:  # its message starts with "function call:"
        raise RowError(str(err)) from None


def _strip_call_wrapping(content: str) -> str:
    """The JSON of a function message, without a leading thought or <tool_call> words around it."""
    if "<tool_call>" in content and "</tool_call>" in content:
        return content.split("<tool_call>", 1)[1].split("</tool_call>", 1)[0]
    if "</think>" in content:
        return content.rsplit("</think>", 1)[1]
    return content


def tools_getter(spec: DatasetSpec, present: list[str]) -> Callable[[dict[str, Any]], str]:
    """The row's `tools` column (columns.tools, default `tools` when present) as JSON text, checked."""
    from lmforge.data.tools import parse_tools

    column = spec.columns.get("tools", "tools" if "tools" in present else None)
    require_columns(spec, {"tools": column}, present)

    def get(row: dict[str, Any]) -> str:
        value = row.get(column) if column else None
        if value in (None, "", []):
            return ""
        try:
            return json.dumps(parse_tools(value), ensure_ascii=False)
        except ValueError as err:  # its message starts with "tools"
            raise RowError(str(err) if column == "tools" else f"column '{column}': {err}") from None

    return get


MEDIA_COLUMNS = ("images", "videos", "audios")


def refuse_media(spec: DatasetSpec, present: list[str]) -> None:
    """Rows with images, videos or audio are refused up front: multimodal training is not supported yet."""
    for key in MEDIA_COLUMNS:
        column = spec.columns.get(key, key)
        if column in present:
            raise LmforgeError(
                f"dataset '{spec.name}': column '{column}' holds {key}: multimodal training is not supported yet; "
                f"lmforge trains on the text turns only (drop the column, or `columns.{key}`, to train on the text)")


def validate_conversation(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Turns alternating prompt (user or observation) and reply (assistant or function), ending with a
    non-empty reply. Trailing prompts (no target) are dropped."""
    while messages and messages[-1]["role"] in ("user", "observation"):
        messages = messages[:-1]
    if not messages:
        raise RowError("no assistant turn to learn from")
    for i, message in enumerate(messages):
        expected = ("user", "observation") if i % 2 == 0 else ("assistant", "function")
        if message["role"] not in expected:
            other = "a tool result" if i % 2 == 0 else "a tool call"
            raise RowError(f"turn {i + 1} is '{message['role']}' but '{expected[0]}' (or {other}) was expected "
                           f"(turns must alternate user, assistant after an optional system message)")
        if i % 2 and not message["content"].strip():
            raise RowError(f"turn {i + 1}: empty assistant message")
    if messages[0]["role"] != "user":
        raise RowError("the conversation must open with a user message")
    return messages


def fill_placeholders(text: str, values: dict[str, str]) -> str:
    """Replace each `{{key}}` in text with its value."""
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    return text


# the converted shape every chat stage shares; stages add their own columns
TURN_FEATURES = {
    "_system": datasets.Value("string"),
    "_messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
    "_invalid": datasets.Value("string"),
}
CONVERSATION_FEATURES = datasets.Features(TURN_FEATURES)
CHAT_FEATURES = {**TURN_FEATURES, "_tools": datasets.Value("string")}  # sft rows: the tools offered, as JSON
RowConverter = Callable[[dict[str, Any], Callable[[str], str]], dict[str, Any]]


def convert_rows(ds: Any, spec: DatasetSpec, convert: RowConverter, features: dict[str, Any], empty: dict[str, Any],
                 remove_columns: list[str], num_proc: int | None, placeholders: dict[str, str] | None,
                 skip_invalid: bool) -> Any:
    """Map every row through `convert(row, fill)` (`fill` puts `{{key}}` values in where the spec allows).
    A row that raises RowError stops the run naming its file and line, or with `skip_invalid` becomes
    `empty` with the reason in `_invalid` (empty for valid rows), for the caller to count and drop."""
    values = placeholders if spec.placeholders and placeholders else {}

    def apply(row: dict[str, Any], index: int) -> dict[str, Any]:
        try:
            return {**convert(row, lambda text: fill_placeholders(text, values)), "_invalid": ""}
        except RowError as err:
            if not skip_invalid:
                raise LmforgeError(f"{row_location(spec, index)}: {err}") from None
            return {**empty, "_invalid": f"{row_location(spec, index)}: {err}"}

    return map_rows(ds, apply, with_indices=True, remove_columns=remove_columns, num_proc=num_proc,
                    desc=f"Converting {spec.name}", features=datasets.Features(features))


def fill_turns(messages: list[dict[str, str]], fill: Callable[[str], str]) -> list[dict[str, str]]:
    """The messages with `fill` applied to each content, roles unchanged."""
    return [{"role": m["role"], "content": fill(m["content"])} for m in messages]


def to_conversations(ds: datasets.Dataset, spec: DatasetSpec, stage: str, num_proc: int | None = None,
                     placeholders: dict[str, str] | None = None, skip_invalid: bool = False) -> datasets.Dataset:
    """Rows -> `_system`, `_messages`, `_invalid` (sft) or `_text` (pt); `{{key}}` filled where the spec
    allows. An invalid row raises, naming file and line, or with `skip_invalid` is kept with its reason
    in `_invalid` (empty for valid rows) for the caller to count and drop."""
    present = list(ds.column_names)
    formatting = detect_formatting(spec, present, stage)
    if stage == "pt":
        return _to_text(ds, spec, formatting, present, num_proc)
    if formatting == "text":
        raise LmforgeError(f"dataset '{spec.name}' is plain text; stage sft needs alpaca, sharegpt or openai rows")
    spec.formatting = formatting  # detected formats pick their own column and tag defaults
    refuse_media(spec, present)
    convert = alpaca_converter(spec, present) if formatting == "alpaca" else sharegpt_converter(spec, present)
    tools = tools_getter(spec, present)

    def conversation(row: dict[str, Any], fill: Callable[[str], str]) -> dict[str, Any]:
        system, messages = convert(row)
        return {"_system": fill(system), "_messages": validate_conversation(fill_turns(messages, fill)),
                "_tools": tools(row)}

    return convert_rows(ds, spec, conversation, CHAT_FEATURES, {"_system": "", "_messages": [], "_tools": ""},
                        present, num_proc, placeholders, skip_invalid)


def to_text(ds: datasets.Dataset, spec: DatasetSpec, num_proc: int | None = None,
            placeholders: dict[str, str] | None = None, skip_invalid: bool = False) -> datasets.Dataset:
    """pt rows -> `_text` (the registry's row converter for stage pt)."""
    return to_conversations(ds, spec, "pt", num_proc, placeholders, skip_invalid)


def to_chat(ds: datasets.Dataset, spec: DatasetSpec, num_proc: int | None = None,
            placeholders: dict[str, str] | None = None, skip_invalid: bool = False) -> datasets.Dataset:
    """sft rows -> `_system`, `_messages`, `_invalid` (the registry's row converter for stage sft)."""
    return to_conversations(ds, spec, "sft", num_proc, placeholders, skip_invalid)


def _to_text(ds: datasets.Dataset, spec: DatasetSpec, formatting: str, present: list[str], num_proc: int | None) -> datasets.Dataset:
    column = spec.columns.get("prompt", "text")
    if formatting != "text" and column not in present:
        raise LmforgeError(f"dataset '{spec.name}' has no text column for stage pt; map one with columns.prompt")
    require_columns(spec, {"prompt": column}, present)

    def apply(row: dict[str, Any], index: int) -> dict[str, Any]:
        value = row.get(column)
        if value is not None and not isinstance(value, str):
            raise LmforgeError(f"{row_location(spec, index)}: '{column}' must be a string")
        return {"_text": value or ""}

    # the features are stated so that a streamed dataset knows its columns too (the pipeline reads them)
    return map_rows(ds, apply, with_indices=True, remove_columns=present, num_proc=num_proc,
                    desc=f"Reading {spec.name}", features=datasets.Features({"_text": datasets.Value("string")}))


def map_rows(ds: Any, fn: Callable, num_proc: int | None = None, desc: str | None = None, **kwargs: Any) -> Any:
    """`Dataset.map` with a progress bar and workers; streamed datasets take neither."""
    if isinstance(ds, datasets.IterableDataset):
        return ds.map(fn, **kwargs)
    return ds.map(fn, num_proc=num_proc, desc=desc, **kwargs)
