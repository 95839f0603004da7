"""`lmforge api` end to end on loopback: the official openai client gets what `lmforge chat` says, usage
counts are the model's, and the guards answer with OpenAI's error body (401, 413, 422, 429, 400, 404),
including a burst beyond the queue and a client that disconnects mid-stream."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from threading import Thread

import httpx
import openai
import pytest
import uvicorn

from lmforge.cli import main
from lmforge.config import GenerationArguments, ModelArguments
from lmforge.config.args import ApiArguments
from lmforge.serve.api import ModelServer, create_app
from lmforge.serve.api_guard import bind_socket
from lmforge.serve.chat import ChatEngine, load_for_inference

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
QUERY = "hi"
MESSAGES = [{"role": "user", "content": QUERY}]
MAX_NEW = 12
LONG = 200  # tokens; this prompt runs to the limit (test_burst_beyond_the_queue_gets_429 checks it)
SAMPLED = {"temperature": 1.0, "top_p": 1.0}  # the tiny random model's greedy replies are mostly newlines


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    tokenizer, model = load_for_inference(ModelArguments(model_name_or_path=str(tiny_llama_dir)))
    return ChatEngine(tokenizer, model, GenerationArguments(max_new_tokens=MAX_NEW))  # repetition_penalty 1.1


@pytest.fixture(scope="module")
def sampled(engine):
    """The same model sampling (seed 42, GenerationArguments' default): replies of varied words."""
    return ChatEngine(engine.tokenizer, engine.model, engine.settings(**SAMPLED))


@pytest.fixture(scope="module")
def base_url(engine):
    """The server on a free loopback port, in a thread of this process; stopped after the module."""
    args = ApiArguments(api_host="127.0.0.1", api_port=0, api_key=KEY, max_concurrency=1, max_queue=1,
                        max_new_tokens_limit=LONG, max_request_bytes=16_000)
    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(ModelServer(engine, args, "tiny")), log_level="warning"))
    thread = Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=15)
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0, timeout=60)


def health(base_url):
    return httpx.get(f"{base_url}/health").json()


def wait_idle(base_url, within=10.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        state = health(base_url)
        if state["active_generations"] == 0 and state["queued"] == 0:
            return state
        time.sleep(0.05)
    raise AssertionError(f"generations still running after {within}s: {health(base_url)}")


def post(base_url, path, body, headers=AUTH, **kwargs):
    return httpx.post(f"{base_url}{path}", json=body, headers=headers, timeout=60, **kwargs)


def assert_error(response, status, param=None):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    assert body["error"]["param"] == param
    return body["error"]


def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


@pytest.mark.parametrize("sampling", [{}, SAMPLED], ids=["greedy", "sampled"])
def test_reply_equals_chat_engine_and_lmforge_chat(sampling, client, engine, tiny_llama_dir, capsys):
    """Unset fields take the server's generation options, the ones `lmforge chat` uses (repetition_penalty 1.1)."""
    response = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=MAX_NEW, **sampling)
    content = response.choices[0].message.content
    assert content.strip() and content == ChatEngine(engine.tokenizer, engine.model,
                                                     engine.settings(**sampling)).reply(MESSAGES)
    assert response.choices[0].finish_reason == "length"
    flags = [arg for key, value in sampling.items() for arg in (f"--{key}", str(value))]
    assert main(["chat", "--model_name_or_path", str(tiny_llama_dir), "--query", QUERY,
                 "--max_new_tokens", str(MAX_NEW), *flags]) == 0
    assert capsys.readouterr().out.strip() == content.strip()


def test_usage_counts_are_the_tokenizers_and_the_models(client, engine):
    response = client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=5)
    prompt_ids = engine.tokenizer(engine.render(MESSAGES), add_special_tokens=False)["input_ids"]
    out = engine.model.generate(**engine._inputs(MESSAGES), **engine._generate_kwargs(engine.settings(max_new_tokens=5)))
    assert response.usage.prompt_tokens == len(prompt_ids)
    assert response.usage.completion_tokens == out.shape[1] - len(prompt_ids) == 5
    assert response.usage.total_tokens == len(prompt_ids) + 5


def test_streamed_reply_equals_the_whole_one(client, sampled):
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=MAX_NEW, stream=True,
                                            stream_options={"include_usage": True}, **SAMPLED)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 3 and "".join(deltas) == sampled.reply(MESSAGES)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == MAX_NEW
    assert len({c.id for c in chunks}) == 1


def test_raw_stream_ends_with_done(base_url):
    body = {"messages": MESSAGES, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, headers=AUTH) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]" and '"finish_reason": "length"' in lines[-2]


def test_stop_strings_cut_the_reply(client, sampled):
    reply = sampled.reply(MESSAGES)
    stop = reply[len(reply) // 2:][:3]
    expected = reply[:reply.find(stop)]
    assert 0 < len(expected) < len(reply)
    whole = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=MAX_NEW,
                                           stop=[stop, "never-there"], **SAMPLED)
    assert whole.choices[0].message.content == expected and whole.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=MAX_NEW, stop=stop,
                                            stream=True, **SAMPLED)
    chunks = [c for c in stream if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_the_request_seed_is_used(client):
    def sample(seed):
        return client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, seed=seed,
                                              **SAMPLED).choices[0].message.content

    assert sample(7) == sample(7) != sample(8)


def test_completions_use_the_raw_prompt(client, engine):
    prompt = "Once upon a time"
    inputs = engine.encode(prompt, add_special_tokens=True)
    expected = "".join(engine.start(inputs, engine.settings(max_new_tokens=6)))
    response = client.completions.create(model="tiny", prompt=prompt, max_tokens=6)
    assert response.choices[0].text == expected
    assert response.usage.prompt_tokens == inputs["input_ids"].shape[1] and response.usage.completion_tokens == 6
    streamed = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_missing_or_wrong_key_gets_401(base_url):
    assert_error(httpx.get(f"{base_url}/v1/models"), 401)
    error = assert_error(post(base_url, "/v1/chat/completions", {"messages": MESSAGES},
                              headers={"Authorization": "Bearer nope"}), 401)
    assert error["code"] == "invalid_api_key"
    assert httpx.get(f"{base_url}/health").status_code == 200  # liveness needs no key


def test_a_body_over_the_limit_gets_413(base_url):
    big = {"messages": [{"role": "user", "content": "x" * 20_000}]}
    assert assert_error(post(base_url, "/v1/chat/completions", big), 413)["code"] == "request_too_large"
    chunked = (b"a" * 1000 for _ in range(20))  # no Content-Length: counted while read
    response = httpx.post(f"{base_url}/v1/chat/completions", content=chunked,
                          headers={**AUTH, "Content-Type": "application/json"})
    assert_error(response, 413)


def test_malformed_requests_get_422_naming_the_field(base_url):
    assert_error(post(base_url, "/v1/chat/completions", {"model": "tiny"}), 422, param="messages")
    error = assert_error(post(base_url, "/v1/chat/completions", {"messages": MESSAGES, "temperature": -1}), 422,
                         param="temperature")
    assert "temperature" in error["message"]
    bad_json = httpx.post(f"{base_url}/v1/chat/completions", content=b"{bad",
                          headers={**AUTH, "Content-Type": "application/json"})
    assert "not valid JSON" in assert_error(bad_json, 422)["message"]
    assert_error(post(base_url, "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}), 422,
                 param="messages.0.role")


def test_requests_the_server_cannot_honour_get_400_or_404(base_url):
    assert_error(post(base_url, "/v1/chat/completions", {"messages": MESSAGES, "n": 2}), 400, param="n")
    tools = [{"type": "function", "function": {"parameters": {}}}]  # no name
    error = assert_error(post(base_url, "/v1/chat/completions", {"messages": MESSAGES, "tools": tools}), 400,
                         param="tools")
    assert error["message"].startswith("tools[0]: expected")
    long_prompt = [{"role": "user", "content": "hello " * 1100}]
    error = assert_error(post(base_url, "/v1/chat/completions", {"messages": long_prompt}), 400, param="messages")
    assert error["code"] == "context_length_exceeded" and "context is 1024" in error["message"]
    turns = [{"role": "assistant", "content": "hi"}]
    assert_error(post(base_url, "/v1/chat/completions", {"messages": turns}), 400, param="messages")
    error = assert_error(post(base_url, "/v1/chat/completions", {"model": "gpt-4", "messages": MESSAGES}), 404,
                         param="model")
    assert error["code"] == "model_not_found"
    assert_error(httpx.get(f"{base_url}/v1/nothing", headers=AUTH), 404)


def test_burst_beyond_the_queue_gets_429(base_url):
    """max_concurrency 1 and max_queue 1: of 6 simultaneous requests two are answered, the rest refused."""
    async def burst():
        async with httpx.AsyncClient(timeout=60) as http:
            body = {"messages": MESSAGES, "max_tokens": 50 * LONG}  # capped to max_new_tokens_limit = LONG
            return await asyncio.gather(*(http.post(f"{base_url}/v1/chat/completions", json=body, headers=AUTH)
                                          for _ in range(6)))

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert set(codes) <= {200, 429} and codes.count(200) >= 2 and 429 in codes, codes
    for response in responses:
        if response.status_code == 429:
            assert assert_error(response, 429)["type"] == "rate_limit_error"
        else:  # this prompt runs to the limit: the disconnect test relies on it
            assert response.json()["usage"]["completion_tokens"] == LONG
            assert response.json()["choices"][0]["finish_reason"] == "length"
    state = wait_idle(base_url)
    assert state["status"] == "ok"
    assert post(base_url, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2}).status_code == 200


def test_a_client_that_disconnects_mid_stream_stops_its_generation(base_url):
    before = wait_idle(base_url)["tokens_generated"]
    body = {"messages": MESSAGES, "max_tokens": LONG, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, headers=AUTH) as response:
        for line in response.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                break  # leaving the block closes the connection with the reply unfinished
    left = time.monotonic()
    after = wait_idle(base_url, within=5)["tokens_generated"]
    assert time.monotonic() - left < 5
    assert 0 < after - before < LONG  # stopped early: an uninterrupted reply is LONG tokens


def test_cli_serves_on_the_port_from_the_environment(tiny_llama_dir, tmp_path):
    """`python -m lmforge api` with API_PORT / API_KEY from the environment; Ctrl+C stops it."""
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "API_PORT": str(port), "API_KEY": "env-key"}
    env.pop("API_HOST", None)
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "api", "--model_name_or_path", str(tiny_llama_dir),
                             "--max_new_tokens", "4"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="env-key", max_retries=0)
        name = tiny_llama_dir.name
        assert [m.id for m in client.models.list().data] == [name]
        reply = client.chat.completions.create(model=name, messages=MESSAGES)
        assert reply.usage.completion_tokens == 4  # the --max_new_tokens default applies
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
        log.close()
    output = (tmp_path / "server.log").read_text()
    assert f"serving {name} at http://127.0.0.1:{port}/v1" in output
    assert code == 130 and "Traceback" not in output


def test_a_stop_that_uvicorn_swallows_still_exits_as_interrupted(tiny_llama_dir, monkeypatch, capsys):
    """Under load the SIGINT uvicorn raises again after its shutdown can be lost in asyncio's runner, and
    Server.run returns as if nothing happened: `lmforge api` still exits 130, saying it was interrupted."""
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)
    code = main(["api", "--model_name_or_path", str(tiny_llama_dir), "--api_port", "0"])
    assert code == 130 and "lmforge: interrupted" in capsys.readouterr().err
