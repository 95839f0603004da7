"""`lmforge api`: an OpenAI-compatible HTTP server (FastAPI + uvicorn, server-sent events) over ChatEngine,
so the API generates exactly what `lmforge chat` does. Each generation runs in a worker thread; a bounded
queue in front of `max_concurrency` slots answers 429 when full, and a client that goes away stops its
generation at the next token."""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from threading import Event, Lock, Semaphore
from typing import Any, AsyncIterator, Callable, Iterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from lmforge.config.args import ApiArguments, GenerationArguments, ModelArguments
from lmforge.errors import LmforgeError
from lmforge.serve.api_guard import RequestGuard, bind_socket, is_loopback
from lmforge.serve.api_schema import (
    ApiError,
    ChatCompletionRequest,
    ChunkFactory,
    CompletionRequest,
    SamplingRequest,
    StopCutter,
    error_body,
    sse,
)
from lmforge.serve.chat import ChatEngine, Generation, load_for_inference

logger = logging.getLogger(__name__)


class Admission:
    """At most `concurrency` generations run at once and `queue` more wait for a slot; beyond that, 429."""

    def __init__(self, concurrency: int, queue: int):
        self.slots = Semaphore(concurrency)
        self.capacity = concurrency + queue
        self.admitted = 0
        self._lock = Lock()

    def enter(self) -> AbstractContextManager:
        """A ticket for one generation, which its worker thread enters (waiting for a slot); 429 when full."""
        with self._lock:
            if self.admitted >= self.capacity:
                raise ApiError(429, f"the server is busy ({self.capacity} requests running or queued): retry later",
                               type="rate_limit_error", code="rate_limit_exceeded")
            self.admitted += 1
        return self._ticket()

    @contextmanager
    def _ticket(self) -> Iterator[None]:
        try:
            with self.slots:
                yield
        finally:
            with self._lock:
                self.admitted -= 1


@dataclass
class Job:
    """One admitted request: its running generation, stop-string cutter and chunk builder."""

    generation: Generation
    pieces: asyncio.Queue
    cutter: StopCutter
    chunks: ChunkFactory
    stop_event: Event
    include_usage: bool
    tools: bool = False  # the request offered tools: a reply that calls them is answered as tool_calls

    def tool_calls(self, engine: ChatEngine, text: str) -> list[dict[str, Any]] | None:
        """The reply's tool calls in OpenAI's shape, when tools were offered and the reply calls them."""
        from lmforge.data.tools import calls_to_openai

        calls = engine.tool_calls(text) if self.tools else None
        return calls_to_openai(calls) if calls else None

    @property
    def finish_reason(self) -> str:
        """stop for a stop string or stop token, length when max_tokens ran out."""
        return "stop" if self.cutter.stopped else self.generation.finish_reason


def chat_messages(request: ChatCompletionRequest) -> list[dict[str, str]]:
    """The request's messages as the chat template takes them: an optional system message first, then
    prompts (user, or tool results) and replies (assistant text, or its tool calls) alternating, ending with
    a prompt. Consecutive tool results are joined into one observation, as in training data."""
    from lmforge.data.formats import RowError, add_message, tool_calls_json

    messages: list[dict[str, str]] = []
    for i, m in enumerate(request.messages):
        role = {"developer": "system", "tool": "observation"}.get(m.role, m.role)
        content = m.text()
        if role == "assistant" and m.tool_calls:
            try:
                role, content = "function", tool_calls_json(m.tool_calls)
            except RowError as err:
                raise ApiError(400, f"messages[{i}].tool_calls: {err}", param=f"messages.{i}.tool_calls") from None
        add_message(messages, role, content)
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    prompts, replies = ("user", "observation"), ("assistant", "function")
    if not turns or turns[0]["role"] != "user" or turns[-1]["role"] not in prompts or any(
            m["role"] not in (prompts if k % 2 == 0 else replies) for k, m in enumerate(turns)):
        raise ApiError(400, "messages must be an optional system message, then user and assistant turns "
                       "alternating (tool results in a user's place, tool calls in an assistant's), ending with a "
                       "user or tool message", param="messages")
    return messages


def request_tools(request: ChatCompletionRequest) -> str:
    """The request's tools as JSON text for the template ('' when none)."""
    from lmforge.data.tools import parse_tools

    if not request.tools:
        return ""
    try:
        return json.dumps(parse_tools(request.tools), ensure_ascii=False)
    except ValueError as err:
        raise ApiError(400, str(err), param="tools") from None


class ModelServer:
    """The model behind the endpoints: turns requests into generations and generations into responses."""

    def __init__(self, engine: ChatEngine, args: ApiArguments, name: str):
        self.engine, self.args, self.name = engine, args, name
        self.admission = Admission(args.max_concurrency, args.max_queue)

    def health(self) -> dict[str, Any]:
        """Liveness plus the load: generations running, requests queued, tokens generated so far."""
        active = self.engine.active
        return {"status": "ok", "model": self.name, "active_generations": active,
                "queued": max(self.admission.admitted - active, 0), "tokens_generated": self.engine.tokens_generated}

    def chat_job(self, request: ChatCompletionRequest) -> Job:
        """Check a chat request, render it with the chat template and start its generation."""
        self._check(request)
        messages, tools = chat_messages(request), request_tools(request)
        try:
            prompt = self.engine.render(messages, tools)
        except Exception as err:  # a Jinja chat template may refuse a conversation (e.g. no system role)
            raise ApiError(400, f"the chat template cannot render these messages: {err}", param="messages") from None
        job = self._start(request, prompt, request.token_limit(), chat=True)
        job.tools = bool(tools)
        return job

    def completion_job(self, request: CompletionRequest) -> Job:
        """Check a completion request and start generating from its raw prompt (no template)."""
        self._check(request)
        return self._start(request, request.prompt_text(), request.token_limit(), chat=False)

    def _check(self, request: SamplingRequest) -> None:
        if request.model and request.model != self.name:
            raise ApiError(404, f"model '{request.model}' is not served here; this server serves '{self.name}'",
                           param="model", code="model_not_found")
        if request.n != 1:
            raise ApiError(400, f"n must be 1 (one choice per request), got {request.n}", param="n")

    def _max_new_tokens(self, requested: int | None, prompt_tokens: int) -> int:
        """The request's max_tokens (else the server's max_new_tokens), capped by max_new_tokens_limit and
        by the room the context leaves after the prompt."""
        context = self.engine.context_length
        if context and prompt_tokens >= context:
            raise ApiError(400, f"the prompt is {prompt_tokens} tokens but the model's context is {context}: "
                           "shorten it", param="messages", code="context_length_exceeded")
        limit = min(requested or self.engine.gen.max_new_tokens, self.args.max_new_tokens_limit)
        return min(limit, context - prompt_tokens) if context else limit

    def _start(self, request: SamplingRequest, prompt: str, requested: int | None, chat: bool) -> Job:
        inputs = self.engine.encode(prompt, add_special_tokens=not chat)  # a chat prompt carries its own BOS
        max_new = self._max_new_tokens(requested, inputs["input_ids"].shape[-1])
        try:
            gen = self.engine.settings(temperature=request.temperature, top_p=request.top_p, seed=request.seed,
                                       max_new_tokens=max_new)
        except LmforgeError as err:
            raise ApiError(400, str(err)) from None
        stop_event, pieces = Event(), asyncio.Queue()
        generation = self.engine.start(inputs, gen, stop_event, slot=self.admission.enter(),
                                       sink=_sink(asyncio.get_running_loop(), pieces))
        return Job(generation, pieces, StopCutter(request.stop_strings()), ChunkFactory(self.name, chat), stop_event,
                   request.include_usage)

    async def pieces(self, job: Job, request: Request) -> AsyncIterator[str]:
        """The reply's text as it is generated, cut at the first stop string; a disconnect (or this iterator
        being cancelled) stops the generation."""
        watcher = asyncio.create_task(_stop_on_disconnect(request, job.stop_event))
        try:
            while (piece := await job.pieces.get()) is not None:
                text = job.cutter.feed(piece)
                if job.cutter.stopped:  # it ends at the next token; reading on to the end makes its counts final
                    job.stop_event.set()
                if text:
                    yield text
            job.generation.raise_errors()
            if tail := job.cutter.flush():
                yield tail
        finally:
            job.stop_event.set()
            watcher.cancel()

    async def respond(self, job: Job, stream: bool, request: Request) -> Any:
        """The response to a started job: server-sent events when the request streams, else one JSON body."""
        if stream:
            return StreamingResponse(self.events(job, request), media_type="text/event-stream")
        return await self.whole(job, request)

    async def whole(self, job: Job, request: Request) -> dict[str, Any]:
        """The non-streamed response."""
        try:
            text = "".join([piece async for piece in self.pieces(job, request)])
        except LmforgeError as err:
            raise ApiError(500, str(err), type="server_error") from None
        g = job.generation
        return job.chunks.whole(text, job.finish_reason, g.prompt_tokens, g.completion_tokens,
                                job.tool_calls(self.engine, text))

    async def events(self, job: Job, request: Request) -> AsyncIterator[str]:
        """The streamed response: the role first (chat), the text deltas, the finish reason, the usage when
        stream_options.include_usage asks for it, then `data: [DONE]`."""
        chunks, extra = job.chunks, {"usage": None} if job.include_usage else {}
        if chunks.chat:
            yield sse(chunks.delta("", role="assistant", **extra))
        held: list[str] = []
        try:
            async for text in self.pieces(job, request):
                if job.tools:  # a reply that may be a tool call is sent once it is whole
                    held.append(text)
                else:
                    yield sse(chunks.delta(text, **extra))
        except LmforgeError as err:  # the status line is already sent: report it in the stream
            yield sse(error_body(str(err), type="server_error"))
            yield sse("[DONE]")
            return
        finish = job.finish_reason
        if held:
            calls = job.tool_calls(self.engine, "".join(held))
            yield sse(chunks.tool_delta(calls) if calls else chunks.delta("".join(held), **extra))
            finish = "tool_calls" if calls else finish
        yield sse(chunks.delta(None if chunks.chat else "", finish_reason=finish, **extra))
        if job.include_usage:
            yield sse(chunks.usage_chunk(job.generation.prompt_tokens, job.generation.completion_tokens))
        yield sse("[DONE]")


def _sink(loop: asyncio.AbstractEventLoop, pieces: asyncio.Queue) -> Callable[[str | None], None]:
    """Hands the generation thread's pieces to the event loop's queue."""
    def put(piece: str | None) -> None:
        with suppress(RuntimeError):  # the loop is closed: the server is shutting down
            loop.call_soon_threadsafe(pieces.put_nowait, piece)

    return put


async def _stop_on_disconnect(request: Request, stop_event: Event, every: float = 0.1) -> None:
    """Set `stop_event` once the client has gone away."""
    while not stop_event.is_set():
        if await request.is_disconnected():
            stop_event.set()
            return
        await asyncio.sleep(every)


def _field(error: dict[str, Any]) -> str | None:
    """The offending field of a validation error, as `messages.0.content` (None: the body itself)."""
    loc = error.get("loc", ())
    if error.get("type") == "json_invalid" or list(loc) == ["body"]:
        return None
    return ".".join(str(p) for p in loc if p != "body") or None


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 in OpenAI's error shape, naming the first fields that are wrong."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        message = "the request body is not valid JSON"
    elif any(_field(e) is None for e in errors):
        message = "the request body must be a JSON object (sent with Content-Type: application/json)"
    else:
        message = "; ".join(f"{_field(e)}: {e.get('msg')}" for e in errors[:5])
    param = _field(errors[0]) if errors else None
    return JSONResponse(error_body(f"invalid request: {message}", param=param), status_code=422)


def create_app(server: ModelServer) -> FastAPI:
    """The FastAPI app: the endpoints, OpenAI-shaped errors, and the auth and body-size guard around them."""
    app = FastAPI(title="lmforge api", version="1")
    app.add_middleware(RequestGuard, api_key=server.args.api_key, max_bytes=server.args.max_request_bytes)
    app.add_exception_handler(ApiError, lambda _, e: JSONResponse(e.body(), status_code=e.status))
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, lambda _, e: JSONResponse(error_body(str(e.detail)), e.status_code))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return server.health()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": server.name, "object": "model", "created": 0, "owned_by": "lmforge"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return await server.respond(server.chat_job(body), body.stream, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await server.respond(server.completion_job(body), body.stream, request)

    return app


def served_name(model_args: ModelArguments, args: ApiArguments) -> str:
    """The model id clients send: served_model_name, else the (last) adapter's or the model's folder name."""
    if args.served_model_name:
        return args.served_model_name
    source = (model_args.adapter_name_or_path or [model_args.model_name_or_path])[-1]
    return Path(str(source).rstrip("/")).name


def run_api(model_args: ModelArguments, gen: GenerationArguments, args: ApiArguments) -> None:
    """Claim the port (failing at once when it is taken), load the model as `lmforge chat` does, and serve
    until interrupted."""
    import uvicorn

    if gen.query is not None:
        raise LmforgeError("query is for `lmforge chat`: the api answers HTTP requests; remove --query")
    sock = bind_socket(args.api_host, args.api_port)
    if not is_loopback(args.api_host):
        logger.warning("api_host %s is not a loopback address: anyone who can reach it can use the model%s",
                       args.api_host, "" if args.api_key else " (no api_key set)")
    tokenizer, model = load_for_inference(model_args, gen.device, gen.infer_dtype)
    server = ModelServer(ChatEngine(tokenizer, model, gen), args, served_name(model_args, args))
    host, port = sock.getsockname()[:2]
    print(f"serving {server.name} at http://{host}:{port}/v1 (Ctrl+C to stop)", flush=True)
    config = uvicorn.Config(create_app(server), log_level="info", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    # uvicorn serves until a signal stops it, then raises that signal again once shut down; under load the
    # SIGINT it raises can land as asyncio's cancel of a task that has already finished, and run() returns
    raise KeyboardInterrupt
