"""The OpenAI wire format of `lmforge api`: stream chunks, error bodies, request fields, stop-string cutting;
and its options and guards (environment defaults, loopback check, taken port, missing extra)."""

import json
import socket
import sys

import pytest

from lmforge.cli import main
from lmforge.config.args import ApiArguments
from lmforge.config.parser import API_GROUPS, all_option_names, init_fields
from lmforge.errors import LmforgeError
from lmforge.serve.api_guard import bind_socket, is_loopback
from lmforge.serve.api_schema import (
    ApiError,
    ChatCompletionRequest,
    ChunkFactory,
    CompletionRequest,
    StopCutter,
    cut_at_stop,
    error_body,
    sse,
)


def stream_through(stops, pieces):
    cutter = StopCutter(stops)
    sent = [cutter.feed(p) for p in pieces]
    return sent, cutter


def test_sse_event_is_one_data_line_and_a_blank_line():
    assert sse({"a": "é"}) == 'data: {"a": "é"}\n\n'
    assert sse("[DONE]") == "data: [DONE]\n\n"


def test_chat_chunks_follow_openai_shape():
    chunks = ChunkFactory("tiny", chat=True)
    first = chunks.delta("", role="assistant")
    text = chunks.delta("Hel")
    last = chunks.delta(None, finish_reason="length")
    for chunk in (first, text, last):
        assert chunk["object"] == "chat.completion.chunk" and chunk["model"] == "tiny"
        assert chunk["id"] == chunks.id and chunk["id"].startswith("chatcmpl-")
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert text["choices"][0] == {"index": 0, "delta": {"content": "Hel"}, "logprobs": None, "finish_reason": None}
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "length"
    usage = chunks.usage_chunk(7, 3)
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def test_completion_chunks_and_whole_responses():
    chunks = ChunkFactory("tiny", chat=False)
    assert chunks.id.startswith("cmpl-")
    assert chunks.delta("ab")["choices"][0] == {"index": 0, "text": "ab", "logprobs": None, "finish_reason": None}
    whole = chunks.whole("ab", "stop", 4, 2)
    assert whole["object"] == "text_completion" and whole["choices"][0]["text"] == "ab"
    assert whole["usage"]["total_tokens"] == 6
    chat = ChunkFactory("tiny", chat=True).whole("hi", "length", 5, 1)
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    assert chat["choices"][0]["finish_reason"] == "length"


def test_error_body_has_openais_four_fields():
    assert error_body("bad", param="n") == {"error": {"message": "bad", "type": "invalid_request_error",
                                                      "param": "n", "code": None}}
    err = ApiError(429, "busy", type="rate_limit_error", code="rate_limit_exceeded")
    assert err.status == 429 and err.body()["error"]["code"] == "rate_limit_exceeded"
    json.dumps(err.body())


@pytest.mark.parametrize("text,stops,expected", [
    ("Hello world. Bye", ["."], "Hello world"),
    ("Hello world. Bye", [" Bye", "lo"], "Hel"),            # the earliest of several
    ("Hello", ["xyz"], "Hello"),
    ("Hello", [], "Hello"),
    ("Hello", [""], "Hello"),                                 # an empty stop string is ignored
    ("stop at once", ["stop"], ""),
])
def test_cut_at_stop(text, stops, expected):
    assert cut_at_stop(text, stops) == expected


def test_streamed_text_never_shows_part_of_a_stop_string():
    sent, cutter = stream_through(["<END>"], ["Hi th", "ere <E", "N", "D> more"])
    assert sent == ["Hi th", "ere ", "", ""]
    assert cutter.stopped and cutter.flush() == "" and cutter.feed("late") == ""


def test_held_back_text_is_released_when_it_is_not_a_stop_string():
    sent, cutter = stream_through(["<END>"], ["a <E", "x b <"])
    assert sent == ["a ", "<Ex b "] and not cutter.stopped
    assert cutter.flush() == "<"
    assert "".join(sent) + "<" == "a <Ex b <"  # nothing lost


def test_stop_string_split_over_many_pieces_is_cut_in_a_stream():
    text = "one two three four"
    sent, cutter = stream_through(["three"], list(text))
    assert "".join(sent) + cutter.flush() == "one two "
    assert cutter.stopped


def test_request_fields():
    req = ChatCompletionRequest(messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                       {"type": "text", "text": "b"}]}],
                                stop="x", max_completion_tokens=5, max_tokens=9, unknown_field=1)
    assert req.messages[0].text() == "ab" and req.stop_strings() == ["x"] and req.token_limit() == 5
    assert req.n == 1 and not req.include_usage
    streamed = ChatCompletionRequest(messages=[{"role": "user", "content": "a"}], stream=True,
                                     stream_options={"include_usage": True}, stop=["a", ""])
    assert streamed.include_usage and streamed.stop_strings() == ["a"]
    image = ChatCompletionRequest(messages=[{"role": "user", "content": [{"type": "image_url"}]}])
    with pytest.raises(ApiError, match="image_url"):
        image.messages[0].text()
    assert CompletionRequest(prompt=["p"]).prompt_text() == "p"
    with pytest.raises(ApiError, match="one prompt"):
        CompletionRequest(prompt=["p", "q"]).prompt_text()


def test_api_options_come_from_the_environment_when_not_given(monkeypatch):
    for name in ("API_HOST", "API_PORT", "API_KEY"):
        monkeypatch.delenv(name, raising=False)
    args = ApiArguments()
    assert (args.api_host, args.api_port, args.api_key) == ("127.0.0.1", 8000, None)
    monkeypatch.setenv("API_HOST", "0.0.0.0")
    monkeypatch.setenv("API_PORT", "9001")
    monkeypatch.setenv("API_KEY", "secret")
    args = ApiArguments()
    assert (args.api_host, args.api_port, args.api_key) == ("0.0.0.0", 9001, "secret")
    assert ApiArguments(api_host="127.0.0.1", api_port=8080).api_port == 8080  # the option wins
    monkeypatch.setenv("API_PORT", "http")
    with pytest.raises(LmforgeError, match="API_PORT must be a port number"):
        ApiArguments()
    with pytest.raises(LmforgeError, match="max_concurrency must be >= 1"):
        ApiArguments(api_port=1, max_concurrency=0)


def test_api_option_names_are_unique_across_its_groups():
    assert sum(len(init_fields(cls)) for cls in API_GROUPS) == len(all_option_names(API_GROUPS))


def test_api_help_lists_its_options(capsys):
    assert main(["api", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--api_host" in out and "--max_new_tokens_limit" in out and "--repetition_penalty" in out


@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("::1", True), ("localhost", True),
                                           ("0.0.0.0", False), ("192.168.1.5", False), ("example.org", False)])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_a_port_in_use_is_a_one_line_error(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(LmforgeError, match=f"port {port} on 127.0.0.1 is in use"):
            bind_socket("127.0.0.1", port)
        # from the CLI: exit 2 and one line, before any model is loaded
        assert main(["api", "--model_name_or_path", "/nonexistent", "--api_port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"lmforge: error: port {port} on 127.0.0.1 is in use: stop what listens there or set --api_port"


def test_missing_fastapi_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastapi", None)
    monkeypatch.delitem(sys.modules, "lmforge.serve.api", raising=False)
    assert main(["api", "--api_port", "0"]) == 2
    assert capsys.readouterr().err.strip() == "lmforge: error: lmforge api needs fastapi: pip install 'lmforge[serve]'"
