"""Row formats: detection from the columns, alpaca / ShareGPT / OpenAI rows to `_system` + `_messages`,
the system-message split, conversation checks and `{{key}}` placeholders."""

import json

import datasets
import pytest

from lmforge.data.catalogue import DatasetSpec
from lmforge.data.formats import (
    RowError,
    alpaca_converter,
    detect_formatting,
    detect_turn_format,
    fill_placeholders,
    sharegpt_converter,
    split_system,
    to_conversations,
    validate_conversation,
)
from lmforge.errors import LmforgeError


def spec(formatting=None, **kwargs):
    return DatasetSpec(name="rows", files=[], file_type="json", formatting=formatting, **kwargs)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.mark.parametrize("columns, stage, expected", [
    (["instruction", "input", "output"], "sft", "alpaca"),
    (["output"], "sft", "alpaca"),
    (["conversations"], "sft", "sharegpt"),
    (["messages"], "sft", "openai"),
    (["messages", "conversations", "instruction"], "sft", "openai"),  # messages wins
    (["text"], "sft", "text"),
    (["text", "instruction", "output"], "pt", "text"),  # pt reads text even beside chat columns
    (["text", "instruction", "output"], "sft", "alpaca"),
])
def test_detect_formatting_from_the_columns(columns, stage, expected):
    assert detect_formatting(spec(), columns, stage) == expected


def test_detect_formatting_keeps_the_catalogues_choice_and_names_the_columns_it_could_not_read():
    assert detect_formatting(spec("sharegpt"), ["messages"], "sft") == "sharegpt"
    with pytest.raises(LmforgeError, match=r"dataset 'rows': cannot tell its format from columns \['a', 'b'\]"):
        detect_formatting(spec(), ["a", "b"], "sft")


@pytest.mark.parametrize("present, expected, kept", [
    (["messages", "chosen"], "openai", "openai"),
    (["conversations", "chosen"], "sharegpt", "sharegpt"),
    (["instruction", "chosen"], "alpaca", "alpaca"),
    (["prompt", "chosen"], "prompt", None),  # the prompt shape keeps no formatting on the spec
])
def test_detect_turn_format_sets_the_specs_formatting(present, expected, kept):
    s = spec()
    assert detect_turn_format(s, present) == expected
    assert s.formatting == kept


def test_split_system_takes_a_leading_system_message_out():
    turns = [user("Hi"), assistant("Hello")]
    assert split_system([{"role": "system", "content": "Be brief."}, *turns], "column") == ("Be brief.", turns)
    assert split_system(turns, "column") == ("column", turns)
    assert split_system([], "x") == ("x", [])
    later = [user("Hi"), {"role": "system", "content": "late"}]
    assert split_system(later) == ("", later)  # only a leading one is a system prompt


def test_alpaca_joins_instruction_and_input_after_the_history():
    convert = alpaca_converter(spec("alpaca"), ["instruction", "input", "output", "history", "system"])
    row = {"instruction": "Translate.", "input": "chat", "output": "cat", "system": "You translate.",
           "history": [["Hi", "Hello"]]}
    assert convert(row) == ("You translate.", [user("Hi"), assistant("Hello"), user("Translate.\nchat"),
                                               assistant("cat")])
    row = {"instruction": "Name a colour.", "input": "", "output": "Red", "system": None, "history": None}
    assert convert(row) == ("", [user("Name a colour."), assistant("Red")])


def test_alpaca_optional_columns_may_be_missing_unless_mapped():
    convert = alpaca_converter(spec("alpaca"), ["instruction", "output"])
    assert convert({"instruction": "Say hi.", "output": "Hi"}) == ("", [user("Say hi."), assistant("Hi")])
    with pytest.raises(LmforgeError, match=r"column 'sys' \(columns.system\) not found"):
        alpaca_converter(spec("alpaca", columns={"system": "sys"}), ["instruction", "output"])


@pytest.mark.parametrize("row, message", [
    ({"instruction": "a", "output": "b", "history": [["only one"]]}, "history must be a list of"),
    ({"instruction": 3, "output": "b"}, "instruction must be a string, got int"),
])
def test_alpaca_bad_rows_say_what_is_wrong(row, message):
    convert = alpaca_converter(spec("alpaca"), ["instruction", "output", "history"])
    with pytest.raises(RowError, match=message):
        convert(row)


def test_sharegpt_maps_from_value_roles_and_splits_the_system_turn():
    convert = sharegpt_converter(spec("sharegpt"), ["conversations"])
    row = {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi"},
                             {"from": "gpt", "value": "Hello"}]}
    assert convert(row) == ("Be kind.", [user("Hi"), assistant("Hello")])


def test_sharegpt_system_column_is_the_default_when_no_system_turn():
    convert = sharegpt_converter(spec("sharegpt", columns={"system": "sys"}), ["conversations", "sys"])
    row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}], "sys": "Column."}
    assert convert(row) == ("Column.", [user("Hi"), assistant("Hello")])


def test_openai_rows_read_role_and_content():
    convert = sharegpt_converter(spec("openai"), ["messages"])
    row = {"messages": [{"role": "system", "content": "S"}, user("Q"), assistant("A")]}
    assert convert(row) == ("S", [user("Q"), assistant("A")])


def test_custom_tags_map_other_role_names():
    s = spec("sharegpt", tags={"role_tag": "speaker", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot"})
    convert = sharegpt_converter(s, ["conversations"])
    row = {"conversations": [{"speaker": "me", "text": "Q"}, {"speaker": "bot", "text": "A"}]}
    assert convert(row) == ("", [user("Q"), assistant("A")])


@pytest.mark.parametrize("turns, message", [
    ([], "'conversations' must be a non-empty list of messages"),
    ([{"from": "human"}], "each message needs 'from' and 'value' keys"),
    ([{"from": "function_call", "value": "{not json"}], "function call: .*not valid JSON"),
    ([{"from": "robot", "value": "x"}], "unknown role 'robot'; known: human, gpt, system, observation, function_call"),
])
def test_sharegpt_bad_rows_say_what_is_wrong(turns, message):
    with pytest.raises(RowError, match=message):
        sharegpt_converter(spec("sharegpt"), ["conversations"])({"conversations": turns})


def test_validate_conversation_drops_trailing_user_turns():
    assert validate_conversation([user("Q"), assistant("A"), user("unanswered")]) == [user("Q"), assistant("A")]


@pytest.mark.parametrize("messages, message", [
    ([user("only a question")], "no assistant turn to learn from"),
    ([assistant("A"), user("Q"), assistant("B")], "turn 1 is 'assistant' but 'user' \\(or a tool result\\) was expected"),
    ([user("Q"), user("Q2"), assistant("A")], "turn 2 is 'user' but 'assistant' \\(or a tool call\\) was expected"),
    ([user("Q"), assistant("  ")], "turn 2: empty assistant message"),
])
def test_validate_conversation_rejects(messages, message):
    with pytest.raises(RowError, match=message):
        validate_conversation(messages)


def test_fill_placeholders_replaces_only_known_keys():
    assert fill_placeholders("I am {{name}} by {{author}}, not {{other}}.", {"name": "Forge", "author": "lmforge"}) == (
        "I am Forge by lmforge, not {{other}}.")


def test_to_conversations_fills_placeholders_where_the_spec_allows():
    rows = datasets.Dataset.from_list([{"instruction": "Who are you, {{name}}?", "output": "I am {{name}}."}])
    filled = to_conversations(rows, spec("alpaca", placeholders=True), "sft", placeholders={"name": "Forge"})
    assert filled[0]["_messages"] == [user("Who are you, Forge?"), assistant("I am Forge.")]
    assert filled[0]["_invalid"] == ""
    kept = to_conversations(rows, spec("alpaca"), "sft", placeholders={"name": "Forge"})
    assert kept[0]["_messages"][1]["content"] == "I am {{name}}."


def test_to_conversations_skips_or_stops_at_an_invalid_row():
    rows = datasets.Dataset.from_list([{"messages": [user("Q"), assistant("A")]},
                                       {"messages": [user("Q"), assistant("")]}])
    converted = to_conversations(rows, spec(), "sft", skip_invalid=True)
    assert converted["_invalid"] == ["", "dataset 'rows' row 2: turn 2: empty assistant message"]
    assert converted[1]["_messages"] == []
    with pytest.raises(LmforgeError, match="^dataset 'rows' row 2: turn 2: empty assistant message$"):
        to_conversations(rows, spec(), "sft")


def test_pt_reads_the_text_column_and_sft_refuses_plain_text():
    rows = datasets.Dataset.from_list([{"text": "A document."}, {"text": None}])
    assert to_conversations(rows, spec(), "pt")["_text"] == ["A document.", ""]
    with pytest.raises(LmforgeError, match="dataset 'rows' is plain text; stage sft needs alpaca, sharegpt or openai"):
        to_conversations(rows, spec(), "sft")


TOOLS = [{"name": "get_weather", "description": "Weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
GLAIVE_ROW = {"conversations": [
    {"from": "human", "value": "Weather in Paris?"},
    {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
    {"from": "observation", "value": '{"temp": 21}'},
    {"from": "gpt", "value": "It is 21 degrees."}], "tools": json.dumps(TOOLS)}


def test_glaive_toolcall_rows_keep_function_and_observation_turns_and_tools():
    ds = to_conversations(datasets.Dataset.from_list([GLAIVE_ROW]), spec("sharegpt"), "sft")
    assert [m["role"] for m in ds[0]["_messages"]] == ["user", "function", "observation", "assistant"]
    assert json.loads(ds[0]["_tools"]) == TOOLS


def test_openai_tool_calls_and_tool_messages_become_function_and_observation_turns():
    row = {"messages": [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "content": "21"}, {"role": "tool", "content": "25"},
        {"role": "assistant", "content": "Paris 21, Rome 25."}], "tools": [{"type": "function", "function": TOOLS[0]}]}
    system, messages = sharegpt_converter(spec("openai"), ["messages", "tools"])(row)
    assert [m["role"] for m in messages] == ["user", "function", "observation", "assistant"]
    assert json.loads(messages[1]["content"]) == [{"name": "get_weather", "arguments": {"city": "Paris"}},
                                                  {"name": "get_weather", "arguments": {"city": "Rome"}}]
    assert messages[2]["content"] == "21\n</tool_response>\n<tool_response>\n25"  # LLaMA-Factory's join


@pytest.mark.parametrize("tools, message", [
    ("[{not json", "rows.jsonl:1: tools: not valid JSON"),
    ('{"name": "f"}', "rows.jsonl:1: tools: expected a list of tool objects"),
])
def test_a_bad_tools_column_names_file_and_line(tmp_path, tools, message):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({**GLAIVE_ROW, "tools": tools}) + "\n")
    from lmforge.data.catalogue import resolve_datasets
    from lmforge.data.loader import load_raw as load_rows

    ds = load_rows(resolve_datasets([str(path)], str(tmp_path))[0])
    with pytest.raises(LmforgeError, match=message):
        to_conversations(ds, resolve_datasets([str(path)], str(tmp_path))[0], "sft")


def test_a_tool_call_that_is_not_json_names_file_and_line(tmp_path):
    bad = dict(GLAIVE_ROW, conversations=[GLAIVE_ROW["conversations"][0], {"from": "function_call", "value": "f(x)"},
                                          *GLAIVE_ROW["conversations"][2:]])
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(GLAIVE_ROW) + "\n" + json.dumps(bad) + "\n")
    from lmforge.data.catalogue import resolve_datasets
    from lmforge.data.loader import load_raw as load_rows

    spec_ = resolve_datasets([str(path)], str(tmp_path))[0]
    with pytest.raises(LmforgeError, match=r"rows.jsonl:2: function call: .*JSON"):
        to_conversations(load_rows(spec_), spec_, "sft")


def test_rows_with_images_are_refused_in_one_line():
    rows = datasets.Dataset.from_list([{"messages": [user("What is this?"), assistant("A cat.")], "images": ["a.png"]}])
    with pytest.raises(LmforgeError, match="column 'images' holds images: multimodal training is not supported yet"):
        to_conversations(rows, spec(), "sft")
