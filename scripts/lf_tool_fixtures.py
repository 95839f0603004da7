"""Regenerate tests/fixtures/lf_tools.json: LLaMA-Factory's tool formats run on fixed inputs.

Run with the Python of a venv that has LLaMA-Factory installed (bench's venv-llamafactory):
    $BENCH_CACHE/venv-llamafactory/bin/python scripts/lf_tool_fixtures.py tests/fixtures/lf_tools.json

For every format in LLaMA-Factory's TOOLS registry it records tool_formatter on each tool list,
function_formatter on each call list and tool_extractor on each reply (the shared replies plus the
format's own function_formatter outputs). A result is {"out": ...} or, where LLaMA-Factory raises,
{"error": "<ExceptionType>: <message>"}; a FunctionCall is written as [name, arguments].
tests/unit/test_tools.py checks lmforge.data.tools against the file without LLaMA-Factory installed.
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path
from typing import Any, Callable

import llamafactory
from llamafactory.data import tool_utils

TODAY = datetime.datetime(2024, 7, 26, 9, 30)


class FixedDatetime(datetime.datetime):
    """datetime with now() pinned, so llama3's "Today Date" is reproducible."""

    @classmethod
    def now(cls, tz: Any = None) -> datetime.datetime:
        return TODAY


WEATHER = {
    "name": "get_weather",
    "description": "查询城市天气 / Get the current weather of a city",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "城市名, e.g. 北京"},
            "unit": {"type": "string", "description": "Temperature unit", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "description": "Days to forecast"},
        },
        "required": ["city"],
    },
}
FLIGHT = {
    "name": "book_flight",
    "description": "Book a flight",
    "parameters": {
        "type": "object",
        "properties": {
            "route": {
                "type": "object",
                "description": "Where from and to",
                "properties": {"from": {"type": "string"}, "to": {"type": "string"}},
                "required": ["from", "to"],
            },
            "passengers": {"type": "array", "description": "Passenger names", "items": {"type": "string"}},
            "cabin": {"type": "string", "enum": ["economy", "business"]},
            "direct": {"type": "boolean", "description": "Non-stop only"},
        },
        "required": ["route", "passengers"],
    },
    "response": {"type": "object", "description": "The booking"},
}
NO_PARAMETERS = {"name": "ping", "description": "Check the service is up"}
INT_ENUM = {
    "name": "set_level",
    "description": "",
    "parameters": {"type": "object", "properties": {"level": {"type": "integer", "enum": [1, 2, 3]}}},
}


def openai(tool: dict[str, Any]) -> dict[str, Any]:
    """A bare tool in OpenAI style."""
    return {"type": "function", "function": tool}


TOOLS = {
    "bare": [WEATHER, FLIGHT],
    "openai": [openai(WEATHER), openai(FLIGHT)],
    "mixed": [openai(WEATHER), FLIGHT],
    "no_parameters": [NO_PARAMETERS],
    "int_enum": [INT_ENUM],
    "empty": [],
}


def args(value: dict[str, Any]) -> str:
    """Arguments as JSON text, as a dataset's function-call message gives them after parsing."""
    return json.dumps(value, ensure_ascii=False)


CALLS = {
    "one": [["get_weather", args({"city": "北京", "unit": "celsius", "days": 3})]],
    "two": [
        ["get_weather", args({"city": "Zürich"})],
        ["book_flight", args({"route": {"from": "東京", "to": "Paris"}, "passengers": ["Ann", "Bó"], "direct": True,
                              "cabin": None, "budget": 1234.5, "stops": [{"code": "ICN", "ok": False}]})],
    ],
    "quoted": [["search", args({"query": 'say "hi", then: bye\nok', "limit": -2})]],
    "no_arguments": [["ping", args({})]],
}

REPLIES = {
    "plain": "The weather in Beijing is sunny, 25°C.",
    "plain_lines": "Sure.\nHere is the answer.",
    "number": "42",
    "json_string": '"just text"',
    "empty_list": "[]",
    "llama3_call": '{"name": "get_weather", "parameters": {"city": "北京"}}',
    "json_list_missing_key": '[{"name": "get_weather"}]',
    "default_bad_json": 'Action: get_weather\nAction Input: {"city": ',
    "glm4_bad_json": 'get_weather\n{"city": "北京"',
    "qwen_bad_json": '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>',
    "qwen_number": "<tool_call>\n42\n</tool_call>",
    "qwen_null": "<tool_call>\nnull\n</tool_call>",
    "qwen_with_thought": 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n'
                         "</tool_call>",
    "minimax1_missing_key": '<tool_calls>\n{"foo": 1}\n</tool_calls>',
    "minimax1_bad_lines": "<tool_calls>\nnot json\n</tool_calls>",
    "minimax2_wrapped": '<minimax:tool_call>\n<invoke name="get_weather">\n<parameter name="city">北京</parameter>\n'
                        '<parameter name="days">3</parameter>\n</invoke>\n</minimax:tool_call>',
    "minimax2_no_invoke": "<minimax:tool_call>\nnothing here\n</minimax:tool_call>",
    "qwen3_5_raw_value": "<tool_call>\n<function=get_weather>\n<parameter=city>\n  {not json\n</parameter>\n"
                         "</function>\n</tool_call>",
    "seed_raw_value": "<seed:tool_call>\n<function=get_weather\n<parameter=city>  北京 </parameter>\n"
                      "</function>\n</seed:tool_call>",
    "lfm2_syntax_error": "<|tool_call_start|>[get_weather(city=)]<|tool_call_end|>",
    "lfm2_single_call": '<|tool_call_start|>get_weather(city="北京", days=3, hot=true)<|tool_call_end|>',
    "lfm2_unknown_name": "<|tool_call_start|>[get_weather(city=beijing)]<|tool_call_end|>",
    "lfm2_set_value": "<|tool_call_start|>[get_weather(days={1, 2})]<|tool_call_end|>",
    "lfm2_not_a_call": "<|tool_call_start|>[1, 2]<|tool_call_end|>",
    "gemma4_call": '<|tool_call>call:get_weather{city:<|"|>北京<|"|>,days:3,hot:true}<tool_call|>',
    "gemma4_bad_key": "<|tool_call>call:get_weather{bad key:1}<tool_call|>",
    "gemma4_json_string": '<|tool_call>call:get_weather{"text"}<tool_call|>',
}


def record(fn: Callable[[], Any]) -> dict[str, Any]:
    """{"out": result} with FunctionCalls as [name, arguments], or {"error": ...} where LLaMA-Factory raises."""
    try:
        out = fn()
    except Exception as error:  # noqa: BLE001 - the failure itself is what is recorded
        return {"error": f"{type(error).__name__}: {error}"}
    if isinstance(out, list):
        out = [[call.name, call.arguments] for call in out]
    return {"out": out}


def format_results(tool: tool_utils.ToolUtils) -> dict[str, Any]:
    """One format's tool_formatter, function_formatter and tool_extractor results on every input."""
    calls = {key: [tool_utils.FunctionCall(*call) for call in value] for key, value in CALLS.items()}
    call_text = {key: record(lambda value=value: tool.function_formatter(value)) for key, value in calls.items()}
    replies = dict(REPLIES)
    replies.update({f"call_text:{key}": result["out"] for key, result in call_text.items() if "out" in result})
    return {
        "tool_text": {key: record(lambda value=value: tool.tool_formatter(value)) for key, value in TOOLS.items()},
        "call_text": call_text,
        "extract": {key: dict(input=text, **record(lambda text=text: tool.tool_extractor(text)))
                    for key, text in replies.items()},
    }


def main(out_path: str) -> None:
    """Run every format on every input and write the fixture."""
    tool_utils.datetime = FixedDatetime
    fixture = {
        "llamafactory": llamafactory.__version__,
        "today": TODAY.date().isoformat(),
        "tools": TOOLS,
        "calls": CALLS,
        "formats": {name: format_results(tool) for name, tool in tool_utils.TOOLS.items()},
    }
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps(fixture, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out_path}: {len(fixture['formats'])} formats")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/lf_tools.json")
