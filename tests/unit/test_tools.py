"""Tool formats against LLaMA-Factory 0.9.5's (tests/fixtures/lf_tools.json, written by
scripts/lf_tool_fixtures.py), and the parsers of `tools` columns and function-call messages."""

import json
from datetime import date
from pathlib import Path

import pytest

from lmforge.data import tools
from lmforge.data.tools import (
    TOOL_FORMATS,
    FunctionCall,
    calls_from_json,
    calls_to_openai,
    get_tool_format,
    parse_tools,
)
from lmforge.errors import LmforgeError

FIXTURE = json.loads((Path(__file__).parents[1] / "fixtures" / "lf_tools.json").read_text(encoding="utf-8"))
CALLS = {key: [FunctionCall(*call) for call in calls] for key, calls in FIXTURE["calls"].items()}
REPLY = object()  # a documented extractor difference: lmforge returns the reply text unchanged


class Contains(str):
    """A documented text difference, checked by a part of lmforge's text."""


# Where LLaMA-Factory 0.9.5 is wrong, lmforge differs on purpose: (format, kind, case) -> lmforge's result.
DIFFERENCES = {
    # LF raises KeyError on a tool without parameters, TypeError on an enum of numbers
    ("default", "tool_text", "no_parameters"): Contains("> Tool Name: ping\nTool Description: Check the service is "
                                                        "up\nTool Args:\n\n"),
    ("default", "tool_text", "int_enum"): Contains("  - level (integer): , should be one of [1, 2, 3]\n"),
    # LF's JSON extractors raise TypeError on a reply that is JSON but not an object ("42", '"text"') and
    # return an empty list for "[]"; a reply without calls comes back as its text
    **{(name, "extract", case): REPLY for name in ("llama3", "mistral") for case in ("number", "json_string",
                                                                                     "empty_list")},
    # ... the same for a <tool_call> block holding a number or null
    **{(name, "extract", case): REPLY for name in ("qwen", "glm4_moe", "ling") for case in ("qwen_number",
                                                                                           "qwen_null")},
    # LF raises KeyError on a <tool_calls> line without "name", and returns [] when no line is a call
    ("minimax1", "extract", "minimax1_missing_key"): REPLY,
    ("minimax1", "extract", "minimax1_bad_lines"): REPLY,
    # LF returns [] for a <minimax:tool_call> block without <invoke>
    ("minimax2", "extract", "minimax2_no_invoke"): REPLY,
    # LF raises TypeError dumping a Python set as JSON
    ("lfm2", "extract", "lfm2_set_value"): REPLY,
    # LF reads true/false/null only as a whole argument, so it cannot parse its own call_text when they are
    # nested ("stops": [{"ok": false}]); lmforge reads them anywhere and gets the calls back
    ("lfm2", "extract", "call_text:two"): [list(call) for call in CALLS["two"]],
}


def run_case(name: str, kind: str, case: str, entry: dict):
    """lmforge's result on one fixture case, in the fixture's shape."""
    fmt = get_tool_format(name)
    try:
        if kind == "tool_text":
            out = fmt.tool_text(FIXTURE["tools"][case])
        elif kind == "call_text":
            out = fmt.call_text(CALLS[case])
        else:
            out = fmt.extract(entry["input"])
    except Exception as error:  # noqa: BLE001 - compared with the exception LF raised
        return {"error": type(error).__name__}
    return {"out": [list(call) for call in out] if isinstance(out, list) else out}


def expected_result(name: str, kind: str, case: str, entry: dict):
    """LF's result, or lmforge's documented one, as run_case's shape (an error by its type only)."""
    lf = {"error": entry["error"].split(":")[0]} if "error" in entry else {"out": entry["out"]}
    documented = DIFFERENCES.get((name, kind, case))
    if documented is None:
        return lf
    ours = {"out": entry["input"] if documented is REPLY else documented}
    assert ours != lf, f"{name} {kind} {case}: documented as a difference, but LF gives the same"
    return ours


@pytest.fixture(autouse=True)
def fixed_today(monkeypatch):
    monkeypatch.setattr(tools, "today_date", lambda: date.fromisoformat(FIXTURE["today"]))


@pytest.mark.parametrize("kind", ["tool_text", "call_text", "extract"])
@pytest.mark.parametrize("name", TOOL_FORMATS)
def test_format_matches_llamafactory(name, kind):
    wrong = []
    for case, entry in FIXTURE["formats"][name][kind].items():
        ours, expected = run_case(name, kind, case, entry), expected_result(name, kind, case, entry)
        if isinstance(expected.get("out"), Contains):
            matched = expected["out"] in ours.get("out", "")
        else:
            matched = ours == expected
        if not matched:
            wrong.append(f"{case}: lmforge {ours!r}\n  expected {expected!r}")
    assert not wrong, "\n".join(wrong)


def test_fixture_covers_every_format_and_input():
    assert TOOL_FORMATS == tuple(FIXTURE["formats"])
    assert len(TOOL_FORMATS) == 13
    for name, results in FIXTURE["formats"].items():
        assert set(results["tool_text"]) == set(FIXTURE["tools"])
        assert set(results["call_text"]) == set(FIXTURE["calls"])
        own = {case for case in results["extract"] if case.startswith("call_text:")}
        assert own == {f"call_text:{case}" for case, r in results["call_text"].items() if "out" in r}, name
    for name, kind, case in DIFFERENCES:
        assert case in FIXTURE["formats"][name][kind], (name, kind, case)


def test_extract_inverts_call_text_for_json_formats():
    for name in ("default", "llama3", "mistral", "minimax1", "qwen", "ling", "qwen3_5", "seed_oss", "lfm2"):
        fmt = get_tool_format(name)
        assert fmt.extract(fmt.call_text(CALLS["two"])) == CALLS["two"], name


def test_llama3_takes_the_date_from_the_argument_or_the_hook():
    fmt = get_tool_format("llama3")
    assert "Today Date: 02 Jan 2025\n" in fmt.tool_text(FIXTURE["tools"]["bare"], today=date(2025, 1, 2))
    assert "Today Date: 26 Jul 2024\n" in fmt.tool_text(FIXTURE["tools"]["bare"])


def test_unknown_tool_format_lists_the_known_ones():
    with pytest.raises(LmforgeError, match="unknown tool format 'qwen4'") as error:
        get_tool_format("qwen4")
    assert all(name in str(error.value) for name in TOOL_FORMATS)
    assert "\n" not in str(error.value)


def test_glm4_refuses_parallel_calls():
    with pytest.raises(ValueError, match="one call per message, got 2"):
        get_tool_format("glm4").call_text(CALLS["two"])


def test_key_value_formats_refuse_arguments_that_are_not_an_object():
    for name in ("lfm2", "minimax2", "qwen3_5", "glm4_moe", "seed_oss"):
        with pytest.raises(ValueError, match="arguments must be a JSON object"):
            get_tool_format(name).call_text([FunctionCall("f", "[1, 2]")])


def test_parse_tools_accepts_text_lists_and_nothing():
    bare, wrapped = FIXTURE["tools"]["bare"], FIXTURE["tools"]["openai"]
    assert parse_tools(json.dumps(bare)) == bare
    assert parse_tools(wrapped) is wrapped  # kept as given: each format wraps or unwraps as LF does
    assert parse_tools(FIXTURE["tools"]["mixed"]) == FIXTURE["tools"]["mixed"]
    assert parse_tools(None) == parse_tools("") == parse_tools("[]") == []


@pytest.mark.parametrize("value, message", [
    ('[{"name": "f",}]', r"tools: not valid JSON \(Expecting property name"),
    ('{"name": "f"}', "tools: expected a list of tool objects"),
    ('["f"]', r"tools\[0\]: expected"),
    ([{"name": "f"}, {"description": "no name"}], r"tools\[1\]: expected"),
    ([{"type": "function", "name": "f"}], r"tools\[0\]: expected"),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], r"tools\[0\] 'f': parameters must be"),
    ([{"name": "f", "parameters": {"properties": [{"name": "x"}]}}], r"tools\[0\] 'f': parameters must be"),
    ([{"name": {1, 2}}], r"tools\[0\]: expected .*, got \{\"name\": \"\{1, 2\}\"\}"),
])
def test_parse_tools_says_what_is_wrong(value, message):
    with pytest.raises(ValueError, match=message) as error:
        parse_tools(value)
    assert "\n" not in str(error.value)


def test_calls_from_json_redumps_arguments_like_llamafactory():
    one = calls_from_json('{"name": "get_weather", "arguments": {"city": "\\u5317\\u4eac", "days":3}}')
    assert one == [FunctionCall("get_weather", '{"city": "北京", "days": 3}')]
    two = calls_from_json(json.dumps([{"name": "a", "arguments": {"x": [1, {"y": None}]}},
                                      {"name": "b", "arguments": {}}]))
    assert two == [FunctionCall("a", '{"x": [1, {"y": null}]}'), FunctionCall("b", "{}")]


@pytest.mark.parametrize("text, message", [
    ('{"name": "f", "arguments": ', r"function call: not valid JSON \(Expecting value"),
    ('{"arguments": {}}', 'expected an object with "name" and "arguments"'),
    ('[{"name": "f", "arguments": {}}, {"name": "g"}]', 'expected an object with "name" and "arguments", got {"name'),
    ('["f"]', "expected an object"),
    ("[]", "an empty list"),
])
def test_calls_from_json_says_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=message) as error:
        calls_from_json(text)
    assert "\n" not in str(error.value)


def test_calls_to_openai():
    assert calls_to_openai(CALLS["two"]) == [
        {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": CALLS["two"][0][1]}},
        {"id": "call_1", "type": "function", "function": {"name": "book_flight", "arguments": CALLS["two"][1][1]}},
    ]
    assert calls_to_openai([]) == []
