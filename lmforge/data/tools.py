"""Tool-calling text, one format per model family: the tools' description for the system prompt, the
assistant's calls, and the calls parsed back out of a model's reply.

The 13 formats write the same text as LLaMA-Factory 0.9.5's, since that is the text the models were tuned
on; tests/fixtures/lf_tools.json pins it. Where LLaMA-Factory's parser crashes, returns no calls as an
empty list, or cannot read its own nested values, these return the reply text (or the calls) instead.
A tool is an OpenAI-style `{"type": "function", "function": {...}}` or a bare `{"name", "description",
"parameters"}`; each format wraps, unwraps or keeps it as LLaMA-Factory's does.
"""

from __future__ import annotations

import ast
import json
import re
from datetime import date
from typing import Any, NamedTuple, Protocol

from lmforge.errors import LmforgeError


class FunctionCall(NamedTuple):
    """One tool call: the function's name and its arguments as JSON text."""

    name: str
    arguments: str


class ToolFormat(Protocol):
    """A model family's tool-calling text."""

    name: str

    def tool_text(self, tools: list[dict[str, Any]]) -> str:
        """The system-prompt text describing the tools (callers skip it when there are none)."""

    def call_text(self, calls: list[FunctionCall]) -> str:
        """The assistant's text making these calls."""

    def extract(self, text: str) -> str | list[FunctionCall]:
        """The calls a model's reply makes, or the reply itself when it makes none."""


def today_date() -> date:
    """Today, for the llama3 prompt's "Today Date"; tests replace this to fix the text."""
    return date.today()


def _dumps(value: Any, **kwargs: Any) -> str:
    return json.dumps(value, ensure_ascii=False, **kwargs)


def _json_or(text: str, fallback: Any) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return fallback


def _unwrapped(tool: dict[str, Any]) -> dict[str, Any]:
    """The function dict of an OpenAI-style tool; a bare one as is."""
    return tool.get("function", tool) if tool.get("type") == "function" else tool


def _wrapped(tool: dict[str, Any]) -> dict[str, Any]:
    """A tool in OpenAI style."""
    return tool if tool.get("type") == "function" else {"type": "function", "function": tool}


def _call(name: str, arguments: Any) -> FunctionCall:
    return FunctionCall(name, _dumps(arguments))


def _as_call(item: Any, arguments_key: str = "arguments") -> FunctionCall | None:
    """A parsed `{"name": ..., "arguments": ...}` object as a call; None for anything else."""
    if isinstance(item, dict) and "name" in item and arguments_key in item:
        return _call(item["name"], item[arguments_key])
    return None


def _arguments(call: FunctionCall) -> dict[str, Any]:
    """A call's arguments as a dict, for the formats that write them key by key."""
    arguments = json.loads(call.arguments)
    if not isinstance(arguments, dict):
        raise ValueError(f"tool call '{call.name}': arguments must be a JSON object, got {call.arguments[:60]}")
    return arguments


def _value_text(value: Any) -> str:
    """An argument value written between tags: a string as is, anything else as JSON."""
    return value if isinstance(value, str) else _dumps(value)


def _tag_arguments(pattern: re.Pattern[str], block: str, strip_text: bool) -> dict[str, Any]:
    """Arguments written as tags: each value as JSON when it parses, else as text (stripped or not)."""
    return {key: _json_or(raw.strip(), raw.strip() if strip_text else raw) for key, raw in pattern.findall(block)}


# ---- default: LLaMA-Factory's own ReAct style ----

DEFAULT_PROMPT = (
    "You have access to the following tools:\n{tool_text}"
    "Use the following format if using a tool:\n```\n"
    "Action: tool name (one of [{tool_names}])\n"
    "Action Input: the input to the tool, in a JSON format representing the kwargs "
    '(e.g. ```{{"input": "hello world", "num_beams": 5}}```)\n```\n'
)
DEFAULT_CALL = re.compile(r"Action:\s*([a-zA-Z0-9_]+)\s*Action Input:\s*(.+?)(?=\s*Action:|\s*$)", re.DOTALL)


class DefaultFormat:
    """`Action: name` / `Action Input: {json}` lines, tools described one argument per line."""

    name = "default"

    def tool_text(self, tools: list[dict[str, Any]]) -> str:
        functions = [_unwrapped(tool) for tool in tools]
        return DEFAULT_PROMPT.format(tool_text="".join(map(self._describe, functions)),
                                     tool_names=", ".join(function["name"] for function in functions))

    @staticmethod
    def _describe(function: dict[str, Any]) -> str:
        # LLaMA-Factory raises on a tool without parameters or with a non-string enum; here they describe
        parameters = function.get("parameters") or {}
        required = parameters.get("required", [])
        lines = []
        for name, param in parameters.get("properties", {}).items():
            extra = ", required" if name in required else ""
            detail = f", should be one of [{', '.join(map(str, param['enum']))}]" if param.get("enum") else ""
            if param.get("items"):
                detail += f", where each item should be {param['items'].get('type', '')}"
            lines.append(f"  - {name} ({param.get('type', '')}{extra}): {param.get('description', '')}{detail}\n")
        return (f"> Tool Name: {function['name']}\nTool Description: {function.get('description', '')}\n"
                f"Tool Args:\n{''.join(lines)}\n")

    def call_text(self, calls: list[FunctionCall]) -> str:
        return "\n".join(f"Action: {name}\nAction Input: {arguments}" for name, arguments in calls)

    def extract(self, text: str) -> str | list[FunctionCall]:
        calls = []
        for name, raw in DEFAULT_CALL.findall(text):
            try:
                calls.append(_call(name.strip(), json.loads(raw.strip().strip('"').strip("`"))))
            except json.JSONDecodeError:
                return text
        return calls or text


# ---- gemma4: declarations and calls in Gemma's own object syntax, strings between <|"|> marks ----

GEMMA_QUOTE = '<|"|>'
GEMMA_CALL = re.compile(r"<\|tool_call>call:([^{\s]+)\{(.*?)\}<tool_call\|>", re.DOTALL)
GEMMA_STRING = re.compile(r'<\|"\|>(.*?)<\|"\|>', re.DOTALL)
GEMMA_BARE_KEY = re.compile(r"(^|[{\s,])([A-Za-z_][A-Za-z0-9_]*)(\s*:)")


def _gemma_quoted(text: Any) -> str:
    return f"{GEMMA_QUOTE}{text}{GEMMA_QUOTE}"


def _gemma_value(value: Any) -> str:
    """A JSON value in Gemma's syntax: quoted strings, bare sorted keys."""
    if isinstance(value, str):
        return _gemma_quoted(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ",".join(f"{key}:{_gemma_value(value[key])}" for key in sorted(value)) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(_gemma_value, value)) + "]"
    return "null" if value is None else str(value)


def _gemma_fields(schema: dict[str, Any]) -> list[str]:
    """A schema's description and upper-cased type, the fields Gemma's declarations keep."""
    fields = [f"description:{_gemma_quoted(schema['description'])}"] if schema.get("description") else []
    if schema.get("type"):
        fields.append(f"type:{_gemma_quoted(str(schema['type']).upper())}")
    return fields


class Gemma4Format:
    """`declaration:name{...}` lines and `<|tool_call>call:name{key:value,...}<tool_call|>` calls."""

    name = "gemma4"

    def tool_text(self, tools: list[dict[str, Any]]) -> str:
        return "\n".join(self._declare(_unwrapped(tool)) for tool in tools)

    @staticmethod
    def _declare(function: dict[str, Any]) -> str:
        text = f"declaration:{function['name']}{{description:{_gemma_quoted(function.get('description', ''))}"
        if parameters := function.get("parameters"):
            fields = []
            if parameters.get("properties"):
                properties = ",".join(f"{name}:{{{','.join(_gemma_fields(schema))}}}"
                                      for name, schema in parameters["properties"].items())
                fields.append(f"properties:{{{properties}}}")
            if parameters.get("required"):
                fields.append(f"required:[{','.join(map(_gemma_quoted, parameters['required']))}]")
            if parameters.get("type"):
                fields.append(f"type:{_gemma_quoted(str(parameters['type']).upper())}")
            text += f",parameters:{{{','.join(fields)}}}"
        if response := function.get("response"):
            fields = [f"description:{_gemma_quoted(response['description'])}"] if response.get("description") else []
            if str(response.get("type", "")).upper() == "OBJECT":
                fields.append(f"type:{_gemma_quoted('OBJECT')}")
            text += f",response:{{{','.join(fields)}}}"
        return text + "}"

    def call_text(self, calls: list[FunctionCall]) -> str:
        return "".join(f"<|tool_call>call:{name}{{{self._arguments_text(arguments)}}}<tool_call|>"
                       for name, arguments in calls)

    @staticmethod
    def _arguments_text(arguments: str) -> str:
        value = _json_or(arguments, arguments)
        if isinstance(value, dict):
            return ",".join(f"{key}:{_gemma_value(value[key])}" for key in sorted(value))
        return value if isinstance(value, str) else _gemma_value(value)

    def extract(self, text: str) -> str | list[FunctionCall]:
        calls = [FunctionCall(name.strip(), self._parse_arguments(block)) for name, block in GEMMA_CALL.findall(text)]
        return calls or text

    @staticmethod
    def _parse_arguments(block: str) -> str:
        """`key:value,...` as JSON text; the block itself when it does not parse (as LLaMA-Factory does)."""
        block = block.strip()
        if not block:
            return "{}"
        as_json = GEMMA_STRING.sub(lambda match: _dumps(match.group(1)), "{" + block + "}")
        for candidate in (GEMMA_BARE_KEY.sub(r'\1"\2"\3', as_json), block):
            try:
                value = json.loads(candidate)
            except json.JSONDecodeError:
                continue
            return value if isinstance(value, str) else _dumps(value)
        return block


# ---- glm4 (ChatGLM-4): one call per message, its name on the first line ----

GLM4_PROMPT = (
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具{tool_text}"
)


class Glm4Format:
    """`name\\n{json}`, one call per assistant message."""

    name = "glm4"

    def tool_text(self, tools: list[dict[str, Any]]) -> str:
        return GLM4_PROMPT.format(tool_text="".join(
            f"\n\n## {function['name']}\n\n{_dumps(function, indent=4)}\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
            for function in map(_unwrapped, tools)))

    def call_text(self, calls: list[FunctionCall]) -> str:
        if len(calls) != 1:
            raise ValueError(f"the glm4 tool format makes one call per message, got {len(calls)} (no parallel calls)")
        return f"{calls[0].name}\n{calls[0].arguments}"

    def extract(self, text: str) -> str | list[FunctionCall]:
        if "\n" not in text:
            return text
        name, rest = text.split("\n", maxsplit=1)
        try:
            return [_call(name, json.loads(rest.strip()))]
        except json.JSONDecodeError:
            return text


# ---- JSON calls: llama3 (`parameters`) and mistral (`arguments`) ----

LLAMA3_PROMPT = (
    "Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n"
    "You have access to the following functions. To call a function, please respond with JSON for a function call. "
    'Respond in the format {{"name": function name, "parameters": dictionary of argument name and its value}}. '
    "Do not use variables.\n\n{tool_text}"
)


def _json_calls(text: str, arguments_key: str) -> str | list[FunctionCall]:
    """A reply that is one JSON call object or a list of them; the reply itself otherwise."""
    value = _json_or(text.strip(), None)
    calls = [_as_call(item, arguments_key) for item in (value if isinstance(value, list) else [value])]
    return calls if calls and None not in calls else text


class Llama3Format:
    """Llama 3.x JSON calls `{"name", "parameters"}` (tools in the system message, with today's date)."""

    name = "llama3"

    def tool_text(self, tools: list[dict[str, Any]], today: date | None = None) -> str:
        described = "".join(_dumps(_wrapped(tool), indent=4) + "\n\n" for tool in tools)
        return LLAMA3_PROMPT.format(date=(today or today_date()).strftime("%d %b %Y"), tool_text=described)

    def call_text(self, calls: list[FunctionCall]) -> str:
        objects = [{"name": name, "parameters": json.loads(arguments)} for name, arguments in calls]
        return _dumps(objects[0] if len(objects) == 1 else objects)

    def extract(self, text: str) -> str | list[FunctionCall]:
        return _json_calls(text, "parameters")


class MistralFormat:
    """Mistral v0.3: `[AVAILABLE_TOOLS]` and a JSON list of `{"name", "arguments"}`."""

    name = "mistral"

    def tool_text(self, tools: list[dict[str, Any]]) -> str:
        return f"[AVAILABLE_TOOLS] {_dumps([_wrapped(tool) for tool in tools])}[/AVAILABLE_TOOLS]"

    def call_text(self, calls: list[FunctionCall]) -> str:
        return _dumps([{"name": name, "arguments": json.loads(arguments)} for name, arguments in calls])

    def extract(self, text: str) -> str | list[FunctionCall]:
        return _json_calls(text, "arguments")


# ---- lfm2: Pythonic calls `[name(key="value", ...)]` ----

LFM2_PROMPT = "List of tools: <|tool_list_start|>{tool_text}<|tool_list_end|>"
LFM2_START, LFM2_END = "<|tool_call_start|>", "<|tool_call_end|>"


class _JsonNames(ast.NodeTransformer):
    """true / false / null, as a model writes them inside Python call syntax, made Python constants."""

    VALUES = {"true": True, "false": False, "null": None}

    def visit_Name(self, node: ast.Name) -> ast.AST:
        return ast.Constant(self.VALUES[node.id]) if node.id in self.VALUES else node


class Lfm2Format:
    """LFM2: tools as a JSON list, calls as a Python list of keyword calls."""

    name = "lfm2"

    def tool_text(self, tools: list[dict[str, Any]]) -> str:
        return LFM2_PROMPT.format(tool_text=_dumps([_unwrapped(tool) for tool in tools]))

    def call_text(self, calls: list[FunctionCall]) -> str:
        def keyword(key: str, value: Any) -> str:  # strings unescaped, as LLaMA-Factory writes them
            return f'{key}="{value}"' if isinstance(value, str) else f"{key}={_dumps(value)}"

        texts = [f"{call.name}({', '.join(keyword(k, v) for k, v in _arguments(call).items())})" for call in calls]
        return f"{LFM2_START}[{', '.join(texts)}]{LFM2_END}"

    def extract(self, text: str) -> str | list[FunctionCall]:
        start = text.find(LFM2_START)
        end = text.find(LFM2_END, start) if start != -1 else -1
        if end == -1:
            return text
        try:
            body = ast.parse(text[start + len(LFM2_START):end].strip(), mode="eval").body
            calls = [self._call(node) for node in (body.elts if isinstance(body, ast.List) else [body])]
        except (SyntaxError, ValueError, TypeError, RecursionError):
            return text
        return calls or text

    @staticmethod
    def _call(node: ast.AST) -> FunctionCall:
        """One `name(key=literal, ...)` node; positional arguments are ignored, as LLaMA-Factory does."""
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            raise ValueError("not a call by name")
        # unlike LLaMA-Factory, true/false/null parse inside lists and dicts too, not only as a whole value
        arguments = {kw.arg: ast.literal_eval(_JsonNames().visit(kw.value)) for kw in node.keywords}
        return FunctionCall(node.func.id, _dumps(arguments))  # TypeError for sets, bytes: not a JSON call


# ---- minimax1 / minimax2 ----

MINIMAX1_PROMPT = (
    "You are provided with these tools:\n<tools>\n{tool_text}</tools>\n\n"
    "If you need to call tools, please respond with <tool_calls></tool_calls> XML tags, and provide tool-name and "
    "json-object of arguments, following the format below:\n<tool_calls>\n"
    '{{"name": <tool-name-1>, "arguments": <args-json-object-1>}}\n...\n</tool_calls>'
)
MINIMAX1_CALLS = re.compile(r"<tool_calls>\s*(.+?)\s*</tool_calls>", re.DOTALL)
MINIMAX2_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more tools to assist with the user query.\n"
    "Here are the tools available in JSONSchema format:\n\n<tools>\n{tool_text}</tools>\n\n"
    "When making tool calls, use XML format to invoke tools and pass parameters:\n"
    '\n<minimax:tool_call>\n<invoke name="tool-name-1">\n<parameter name="param-key-1">param-value-1</parameter>\n'
    '<parameter name="param-key-2">param-value-2</parameter>\n...\n</invoke>\n</minimax:tool_call>'
)
MINIMAX2_CALLS = re.compile(r"<minimax:tool_call>\s*(.+?)\s*</minimax:tool_call>", re.DOTALL)
MINIMAX2_INVOKE = re.compile(r'<invoke name="(.*?)">(.*?)</invoke>', re.DOTALL)
MINIMAX2_PARAMETER = re.compile(r'<parameter name="(.*?)">(.*?)</parameter>', re.DOTALL)


class MiniMax1Format:
    """MiniMax-M1: one JSON call per line inside `<tool_calls>`."""

    name = "minimax1"

    def tool_text(self, tools: list[dict[str, Any]]) -> str:
        return MINIMAX1_PROMPT.format(tool_text="".join(_dumps(_unwrapped(tool)) + "\n" for tool in tools))

    def call_text(self, calls: list[FunctionCall]) -> str:
        lines = [_dumps({"name": name, "arguments": json.loads(arguments)}) for name, arguments in calls]
        return "<tool_calls>\n" + "\n".join(lines) + "\n</tool_calls>"

    def extract(self, text: str) -> str | list[FunctionCall]:
        match = MINIMAX1_CALLS.search(text)
        if not match:
            return text
        # lines that are not call objects are skipped (LLaMA-Factory skips bad JSON, raises on missing keys)
        calls = [_as_call(_json_or(line.strip(), None)) for line in match.group(1).split("\n")]
        return [call for call in calls if call] or text


class MiniMax2Format:
    """MiniMax-M2: `<invoke name="...">` with one `<parameter name="...">` tag per argument."""

    name = "minimax2"

    def tool_text(self, tools: list[dict[str, Any]]) -> str:
        return MINIMAX2_PROMPT.format(tool_text="".join(f"<tool>{_dumps(_unwrapped(tool))}</tool>\n" for tool in tools))

    def call_text(self, calls: list[FunctionCall]) -> str:
        return "\n".join(
            f'<invoke name="{call.name}">'
            + "".join(f'\n<parameter name="{key}">{_value_text(value)}</parameter>'
                      for key, value in _arguments(call).items())
            + "\n</invoke>"
            for call in calls)

    def extract(self, text: str) -> str | list[FunctionCall]:
        match = MINIMAX2_CALLS.search(text)
        if not match:
            return text
        calls = [_call(name.strip(), _tag_arguments(MINIMAX2_PARAMETER, block, strip_text=False))
                 for name, block in MINIMAX2_INVOKE.findall(match.group(1))]
        return calls or text


# ---- qwen and its kin: JSON calls between <tool_call> tags ----

QWEN_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tool_text}"
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, '
    '"arguments": <args-json-object>}}\n</tool_call>'
)
QWEN_CALL = re.compile(r"<tool_call>(.+?)</tool_call>(?=\s*<tool_call>|\s*$)", re.DOTALL)
GLM4_MOE_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tool_text}"
    "\n</tools>\n\nFor each function call, output the function name and arguments within the following XML format:"
    "\n<tool_call>{{function-name}}\n<arg_key>{{arg-key-1}}</arg_key>\n<arg_value>{{arg-value-1}}</arg_value>"
    "\n<arg_key>{{arg-key-2}}</arg_key>\n<arg_value>{{arg-value-2}}</arg_value>\n...\n</tool_call>\n"
)
LING_PROMPT = QWEN_PROMPT.removeprefix("\n\n") + "\ndetailed thinking off"


class QwenFormat:
    """Qwen 2.5: `<tool_call>\\n{"name", "arguments"}\\n</tool_call>`, tools as OpenAI-style JSON lines."""

    name = "qwen"
    prompt = QWEN_PROMPT

    def tool_text(self, tools: list[dict[str, Any]]) -> str:
        return self.prompt.format(tool_text="".join("\n" + _dumps(_wrapped(tool)) for tool in tools))

    def call_text(self, calls: list[FunctionCall]) -> str:
        return "\n".join(f"<tool_call>\n{_dumps({'name': name, 'arguments': json.loads(arguments)})}\n</tool_call>"
                         for name, arguments in calls)

    def extract(self, text: str) -> str | list[FunctionCall]:
        calls = [_as_call(_json_or(block.strip(), None)) for block in QWEN_CALL.findall(text)]
        return calls if calls and None not in calls else text


class LingFormat(QwenFormat):
    """Ling v2: Qwen's calls, its prompt without the leading blank lines and with thinking off."""

    name = "ling"
    prompt = LING_PROMPT


class Glm4MoeFormat(QwenFormat):
    """GLM-4.5 and later: `<tool_call>name` then `<arg_key>` / `<arg_value>` pairs; replies parsed as Qwen's
    (LLaMA-Factory has no parser for the arg_key form)."""

    name = "glm4_moe"
    prompt = GLM4_MOE_PROMPT

    def call_text(self, calls: list[FunctionCall]) -> str:
        return "\n".join(
            f"\n<tool_call>{call.name}"
            + "".join(f"\n<arg_key>{key}</arg_key>\n<arg_value>{_value_text(value)}</arg_value>"
                      for key, value in _arguments(call).items())
            for call in calls)


# ---- qwen3_5 and seed_oss: `<function=name>` with `<parameter=key>` tags ----

QWEN35_PROMPT = (
    "\n\n# Tools\n\nYou have access to the following functions:\n\n<tools>{tool_text}"
    "\n</tools>\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n"
    "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n"
    "<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple lines\n"
    "</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n"
    "- Function calls MUST follow the specified format: "
    "an inner <function=...></function> block must be nested within <tool_call></tool_call> XML tags\n"
    "- Required parameters MUST be specified\n"
    "- You may provide optional reasoning for your function call in natural language "
    "BEFORE the function call, but NOT after\n"
    "- If there is no function call available, answer the question like normal with your current knowledge "
    "and do not tell the user about function calls\n</IMPORTANT>"
)
QWEN35_CALL = re.compile(r"<tool_call>\s*<function=\s*([^\s<>]+)\s*(.*?)\s*</function>\s*</tool_call>", re.DOTALL)
SEED_PROMPT = (
    "system\nYou are Doubao, a helpful AI assistant. You may call one or more functions to assist with the user query."
    "Tool List:\nYou are authorized to use the following tools (described in JSON Schema format). Before performing "
    "any task, you must decide how to call them based on the descriptions and parameters of these tools.{tool_text}\n"
    "工具调用请遵循如下格式:\n<seed:tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>value_1"
    "</parameter>\n<parameter=example_parameter_2>This is the value for the second parameter\nthat can span\nmultiple "
    "lines</parameter>\n</function>\n</seed:tool_call>\n"
)
SEED_CALL = re.compile(r"<seed:tool_call>\s*<function=\s*([^\s<]+)\s*(.*?)\s*</function>\s*</seed:tool_call>",
                       re.DOTALL)
PARAMETER_TAG = re.compile(r"<parameter=(.*?)>(.*?)</parameter>", re.DOTALL)


class Qwen35Format:
    """Qwen 3.5: `<tool_call><function=name>` with each value on its own lines in `<parameter=key>`."""

    name = "qwen3_5"

    def tool_text(self, tools: list[dict[str, Any]]) -> str:
        return QWEN35_PROMPT.format(tool_text="".join("\n" + _dumps(_unwrapped(tool)) for tool in tools))

    def call_text(self, calls: list[FunctionCall]) -> str:
        return "\n".join(
            f"<tool_call>\n<function={call.name}>"
            + "".join(f"\n<parameter={key}>\n{_value_text(value)}\n</parameter>"
                      for key, value in _arguments(call).items())
            + "\n</function>\n</tool_call>"
            for call in calls)

    def extract(self, text: str) -> str | list[FunctionCall]:
        calls = [_call(name.strip(), _tag_arguments(PARAMETER_TAG, block, strip_text=True))
                 for name, block in QWEN35_CALL.findall(text)]
        return calls or text


class SeedOssFormat:
    """Seed-OSS: `<seed:tool_call><function=name` with `<parameter=key>value</parameter>`; tools kept as given."""

    name = "seed_oss"

    def tool_text(self, tools: list[dict[str, Any]]) -> str:
        return SEED_PROMPT.format(tool_text="\n" + _dumps(tools))

    def call_text(self, calls: list[FunctionCall]) -> str:
        return "\n".join(
            f"\n<seed:tool_call>\n<function={call.name}"
            + "".join(f"\n<parameter={key}>{_value_text(value)}</parameter>" for key, value in _arguments(call).items())
            + "\n</function>\n</seed:tool_call>"
            for call in calls)

    def extract(self, text: str) -> str | list[FunctionCall]:
        calls = [_call(name.strip(), _tag_arguments(PARAMETER_TAG, block, strip_text=False))
                 for name, block in SEED_CALL.findall(text)]
        return calls or text


# ---- the registry and the column / message parsers ----

_FORMATS: dict[str, ToolFormat] = {fmt.name: fmt for fmt in (
    DefaultFormat(), Gemma4Format(), Glm4Format(), Llama3Format(), Lfm2Format(), MiniMax1Format(),
    MiniMax2Format(), MistralFormat(), QwenFormat(), Qwen35Format(), Glm4MoeFormat(), SeedOssFormat(), LingFormat(),
)}
TOOL_FORMATS: tuple[str, ...] = tuple(_FORMATS)


def get_tool_format(name: str) -> ToolFormat:
    """The tool format called `name` (a template's tool_format)."""
    if name not in _FORMATS:
        raise LmforgeError(f"unknown tool format '{name}'; known: {', '.join(TOOL_FORMATS)}")
    return _FORMATS[name]


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else _dumps(value, default=repr)
    return text if len(text) <= 80 else text[:77] + "..."


def _load_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{what}: not valid JSON ({error.msg} at line {error.lineno} column {error.colno}): "
                         f"{_short(text)!r}") from None


def parse_tools(value: Any) -> list[dict[str, Any]]:
    """A `tools` column value (JSON text of a list, or a list) as a list of tools, each OpenAI-style or bare and
    kept as given; None or blank text is no tools. ValueError says what is wrong."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    tools = _load_json(value, "tools") if isinstance(value, str) else value
    if not isinstance(tools, list):
        raise ValueError(f"tools: expected a list of tool objects, got {_short(tools)}")
    for i, tool in enumerate(tools):
        # {"type": "function", "name": ...} (the Responses API's flat form) is refused: LF's formats disagree on it
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else tool
        if not (isinstance(function, dict) and isinstance(function.get("name"), str)):
            raise ValueError(f"tools[{i}]: expected {{\"name\", \"description\", \"parameters\"}} or "
                             f"{{\"type\": \"function\", \"function\": {{...}}}}, got {_short(tool)}")
        parameters = function.get("parameters", {})
        if not (isinstance(parameters, dict) and isinstance(parameters.get("properties", {}), dict)):
            raise ValueError(f"tools[{i}] '{function['name']}': parameters must be a JSON schema object "
                             f"with an object of properties, got {_short(parameters)}")
    return tools


def calls_from_json(text: str) -> list[FunctionCall]:
    """An assistant function-call message, a JSON `{"name", "arguments"}` object or a list of them, as calls."""
    value = _load_json(text, "function call")
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError("function call: an empty list, no calls")
    calls = [_as_call(item) for item in items]
    for item, call in zip(items, calls):
        if call is None:
            raise ValueError(f"function call: expected an object with \"name\" and \"arguments\", got {_short(item)}")
    return calls


def calls_to_openai(calls: list[FunctionCall]) -> list[dict[str, Any]]:
    """Calls as the OpenAI API's `tool_calls`, numbered call_0, call_1, ..."""
    return [{"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": arguments}}
            for i, (name, arguments) in enumerate(calls)]
