"""Tool calling end to end: LLaMA-Factory's glaive rows train (loss on the calls, none on the tool results),
`lmforge chat --tools` and the API answer a reply that calls a tool with the calls as JSON / `tool_calls`."""

import io
import json
from pathlib import Path
from threading import Thread

import openai
import pytest
import uvicorn

from lmforge.cli import main
from lmforge.config import GenerationArguments, ModelArguments
from lmforge.config.args import ApiArguments, DataArguments
from lmforge.data.pipeline import LoadReport, load_conversations
from lmforge.data.processors import IGNORE_INDEX, MaskPolicy, encode_sft_batch
from lmforge.data.templates import template_for
from lmforge.serve.api import ModelServer, create_app
from lmforge.serve.api_guard import bind_socket
from lmforge.serve.chat import ChatEngine, load_for_inference, run_repl

ROOT = Path(__file__).resolve().parents[2]
WEATHER = {"name": "get_weather", "description": "Current weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'  # qwen's format


def test_glaive_rows_train_the_calls_and_not_the_tool_results(smol_tokenizer):
    args = DataArguments(dataset=["glaive_toolcall_demo"], dataset_dir=str(ROOT / "data"), template="qwen")
    ds = load_conversations(args.dataset, args, "sft", 0, None, LoadReport())
    template = template_for(args, smol_tokenizer)
    row = ds[0]
    out = encode_sft_batch({"_system": [row["_system"]], "_messages": [row["_messages"]], "_tools": [row["_tools"]]},
                           smol_tokenizer, template, MaskPolicy(None))
    ids, labels = out["input_ids"][0], out["labels"][0]
    text = smol_tokenizer.decode(ids)
    assert "# Tools" in text and '"name": "get_weather"' in text  # the tools are described in the system prompt
    trained = smol_tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX])
    assert trained == (CALL + "<|im_end|>\n" + "It is 21 °C and sunny in Paris.<|im_end|>\n")
    assert "<tool_response>" not in trained and "temperature" not in trained


def test_the_glaive_demo_trains(tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    assert main(["train", "--model_name_or_path", str(tiny_llama_dir), "--dataset", "glaive_toolcall_demo",
                 "--dataset_dir", str(ROOT / "data"), "--template", "qwen", "--output_dir", str(out),
                 "--max_steps", "2", "--per_device_train_batch_size", "2", "--save_strategy", "no",
                 "--report_to", "none", "--logging_steps", "1"]) == 0
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2]


class ScriptedGeneration:
    """Stands in for a model's generation: hands the scripted reply to the sink at once."""

    def __init__(self, text, sink):
        self.prompt_tokens, self.completion_tokens, self.finish_reason = 5, 3, "stop"
        if sink:
            sink(text)
            sink(None)

    def __iter__(self):
        yield self.text

    def raise_errors(self):
        pass


class ScriptedEngine(ChatEngine):
    """The tiny model's engine whose every reply is `script` (the model cannot call tools by itself)."""

    script = CALL

    def start(self, inputs, gen=None, stop_event=None, slot=None, sink=None):
        self.last_prompt = self.tokenizer.decode(inputs["input_ids"][0])
        generation = ScriptedGeneration(self.script, sink)
        generation.text = self.script
        return generation


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    tokenizer, model = load_for_inference(ModelArguments(model_name_or_path=str(tiny_llama_dir)))
    return ScriptedEngine(tokenizer, model, GenerationArguments(template="qwen", max_new_tokens=8))


@pytest.fixture(scope="module")
def client(engine):
    args = ApiArguments(api_host="127.0.0.1", api_port=0, api_key="k")
    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(ModelServer(engine, args, "tiny")), log_level="warning"))
    thread = Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        pass
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1", api_key="k", max_retries=0)
    server.should_exit = True
    thread.join(timeout=15)


TOOLS = [{"type": "function", "function": WEATHER}]
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def test_api_answers_a_tool_call_as_tool_calls(client, engine):
    reply = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert (call.type, call.function.name, json.loads(call.function.arguments)) == (
        "function", "get_weather", {"city": "Paris"})
    assert '"name": "get_weather"' in engine.last_prompt and "<tools>" in engine.last_prompt


def test_api_streams_a_tool_call_as_one_delta(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, stream=True))
    calls = [c for chunk in chunks for c in (chunk.choices[0].delta.tool_calls or []) if chunk.choices]
    assert [(c.index, c.function.name) for c in calls] == [(0, "get_weather")]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_api_renders_a_whole_tool_round_trip(client, engine):
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_0", "content": '{"temperature": 21}'}]
    client.chat.completions.create(model="tiny", messages=history, tools=TOOLS)
    assert engine.last_prompt.endswith('<|im_start|>user\n<tool_response>\n{"temperature": 21}\n</tool_response>'
                                       '<|im_end|>\n<|im_start|>assistant\n')
    assert CALL + "<|im_end|>\n" in engine.last_prompt


def test_api_without_tools_sends_the_call_text_as_content(client):
    reply = client.chat.completions.create(model="tiny", messages=ASK)
    assert reply.choices[0].message.content == CALL and reply.choices[0].finish_reason == "stop"


def test_api_refuses_bad_tools_and_bad_tool_arguments(client):
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model="tiny", messages=ASK, tools=[{"type": "function", "function": {}}])
    bad = [*ASK, {"role": "assistant", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "get_weather", "arguments": "{city"}}]},
        {"role": "tool", "content": "x"}]
    with pytest.raises(openai.BadRequestError, match="arguments are not valid JSON"):
        client.chat.completions.create(model="tiny", messages=bad, tools=TOOLS)


class ToolStub:
    """A REPL engine that calls a tool first, then answers with the tool's result."""

    tools = json.dumps([WEATHER])

    def __init__(self):
        self.seen = []

    def stream(self, messages):
        self.seen.append([m["role"] for m in messages])
        yield CALL if messages[-1]["role"] == "user" else "It is 21 degrees."

    def tool_calls(self, reply):
        from lmforge.data.tools import get_tool_format

        calls = get_tool_format("qwen").extract(reply)
        return calls if isinstance(calls, list) else None


def test_repl_prints_tool_calls_as_json_and_reads_the_result():
    engine, out = ToolStub(), io.StringIO()
    run_repl(engine, io.StringIO('Weather in Paris?\n{"temperature": 21}\nexit\n'), out)
    assert 'Tool calls: [{"name": "get_weather", "arguments": {"city": "Paris"}}]' in out.getvalue()
    assert engine.seen == [["user"], ["user", "function", "observation"]]
    assert "It is 21 degrees." in out.getvalue()


def test_chat_refuses_a_tools_file_that_is_not_a_list(tmp_path, tiny_llama_dir, capsys):
    bad = tmp_path / "tools.json"
    bad.write_text('{"name": "f"}')
    assert main(["chat", "--model_name_or_path", str(tiny_llama_dir), "--template", "qwen", "--tools", str(bad),
                 "--query", "hi"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f'lmforge: error: {bad}: tools: expected a list of tool objects, got {{"name": "f"}}']
