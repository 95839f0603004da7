"""Generate replies with a trained model: one-shot or streamed, rendered by the training templates."""

from __future__ import annotations

import dataclasses
import json
import sys
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from queue import Queue
from threading import Event, Lock, Thread
from typing import Any, Callable, Iterator, TextIO

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer, set_seed

from lmforge.config import GenerationArguments, ModelArguments
from lmforge.data.templates import stop_token_ids, template_for
from lmforge.errors import LmforgeError
from lmforge.model.adapters import fill_base_model, load_merged

DEFAULT_MODEL = "smollm2-135m-instruct"


def load_for_inference(model_args: ModelArguments, device: str = "auto", infer_dtype: str = "auto") -> tuple[Any, Any]:
    """Tokenizer and model in eval mode; LoRA adapters applied (all merged but kept exact); on the GPU when
    there is one (device auto), in `infer_dtype` (auto: the checkpoint's own)."""
    fill_base_model(model_args, default=DEFAULT_MODEL)
    if infer_dtype != "auto":
        model_args.torch_dtype = infer_dtype
    return load_merged(model_args, device=device)


class StopOnEvent(StoppingCriteria):
    """Ends generation at the next token once `event` is set (the API sets it when its client goes away)."""

    def __init__(self, event: Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class CountingStreamer(TextStreamer):
    """Hands each decoded piece of the reply to `sink` (then None once the reply is complete) and keeps the
    reply's token ids, for usage counts and the finish reason."""

    def __init__(self, tokenizer: Any, sink: Callable[[str | None], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.sink = sink
        self.generated: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        if not self.next_tokens_are_prompt:
            self.generated.extend(value.reshape(-1).tolist())
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.sink(text)
        if stream_end:
            self.sink(None)


class Generation:
    """One generation, started in its own thread at once. Its text pieces go to `sink` (None marks the end),
    or, without one, come from iterating it. Once they have ended, `completion_tokens` and `finish_reason`
    say what happened, and `raise_errors` re-raises what went wrong in the thread."""

    def __init__(self, engine: ChatEngine, inputs: dict[str, torch.Tensor], gen: GenerationArguments,
                 stop_event: Event, slot: AbstractContextManager, sink: Callable[[str | None], None] | None = None):
        self.engine, self.gen, self.stop_event = engine, gen, stop_event
        self.prompt_tokens = inputs["input_ids"].shape[-1]
        self._pieces: Queue[str | None] = Queue()
        self.streamer = CountingStreamer(engine.tokenizer, sink or self._pieces.put)
        kwargs = {**inputs, **engine._generate_kwargs(gen), "streamer": self.streamer,
                  "stopping_criteria": StoppingCriteriaList([StopOnEvent(stop_event)])}
        self.errors: list[BaseException] = []
        self.thread = Thread(target=self._run, args=(kwargs, slot), daemon=True)
        self.thread.start()

    def _run(self, kwargs: dict[str, Any], slot: AbstractContextManager) -> None:
        ended = False
        try:
            with slot:  # waits for a free generation slot (the API bounds concurrent generations)
                if not self.stop_event.is_set():
                    with self.engine.running(self.streamer):
                        set_seed(self.gen.seed)
                        with torch.inference_mode():
                            self.engine.model.generate(**kwargs)
                    ended = True  # generate() ends the streamer itself
        except BaseException as err:  # surfaced in the iterating thread
            self.errors.append(err)
        finally:
            if not ended:
                self.streamer.end()

    def __iter__(self) -> Iterator[str]:
        while (piece := self._pieces.get()) is not None:
            yield piece
        self.thread.join()
        self.raise_errors()

    def raise_errors(self) -> None:
        """Re-raise a failure of the generation thread as a one-line error."""
        if self.errors:
            raise LmforgeError(f"generation failed: {self.errors[0]}")

    @property
    def completion_tokens(self) -> int:
        """Tokens generated, the closing stop token included."""
        return len(self.streamer.generated)

    @property
    def finish_reason(self) -> str:
        """OpenAI's finish reason: length when max_new_tokens ran out before a stop token, else stop."""
        ids = self.streamer.generated
        if ids and ids[-1] not in self.engine.stop_ids and len(ids) >= self.gen.max_new_tokens:
            return "length"
        return "stop"


class ChatEngine:
    """Holds tokenizer, model and template; turns a message list into a reply."""

    def __init__(self, tokenizer: Any, model: Any, gen: GenerationArguments):
        self.tokenizer, self.model, self.gen = tokenizer, model, gen
        self.template = template_for(gen, tokenizer)
        self.stop_ids = stop_token_ids(tokenizer, self.template)
        self.tools = read_tools_file(gen.tools) if gen.tools else ""
        self.active, self.tokens_generated, self._lock = 0, 0, Lock()

    @property
    def context_length(self) -> int | None:
        """The most positions the model attends to (prompt plus reply), when its config says."""
        return getattr(self.model.config, "max_position_embeddings", None)

    def render(self, messages: list[dict[str, str]], tools: str | None = None) -> str:
        """The prompt text of a conversation; a leading system message replaces the configured system prompt.
        `tools` (JSON text; default: the --tools file's) are described to the model as the template does."""
        system = self.gen.system or ""
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        return self.template.render_prompt(system, messages, self.tools if tools is None else tools)

    def tool_calls(self, reply: str) -> list[Any] | None:
        """The calls in a reply, parsed back with the template's tool format (None: a plain answer)."""
        from lmforge.data.tools import get_tool_format

        fmt = getattr(self.template, "calls", None) or get_tool_format(self.gen.tool_format or "default")
        calls = fmt.extract(reply)
        return calls if isinstance(calls, list) and calls else None

    def encode(self, prompt: str, add_special_tokens: bool = False) -> dict[str, torch.Tensor]:
        """Token ids of a prompt on the model's device (a rendered chat prompt carries its own special tokens)."""
        enc = self.tokenizer(prompt, add_special_tokens=add_special_tokens, return_tensors="pt")
        return {k: v.to(self.model.device) for k, v in enc.items()}

    def _inputs(self, messages: list[dict[str, str]]) -> dict[str, torch.Tensor]:
        return self.encode(self.render(messages))

    def settings(self, **overrides: Any) -> GenerationArguments:
        """The configured generation settings with the given (non-None) values replaced, checked again."""
        return dataclasses.replace(self.gen, **{k: v for k, v in overrides.items() if v is not None})

    def _generate_kwargs(self, gen: GenerationArguments | None = None) -> dict[str, Any]:
        g = gen or self.gen
        sampling = g.temperature > 0
        kwargs: dict[str, Any] = {
            "max_new_tokens": g.max_new_tokens, "do_sample": sampling, "repetition_penalty": g.repetition_penalty,
            "eos_token_id": self.stop_ids, "pad_token_id": self.tokenizer.pad_token_id,
        }
        if sampling:
            kwargs |= {"temperature": g.temperature, "top_p": g.top_p, "top_k": g.top_k}
        else:
            kwargs |= {"temperature": None, "top_p": None, "top_k": None}
        return kwargs

    @contextmanager
    def running(self, streamer: CountingStreamer) -> Iterator[None]:
        """Counts the generations running inside it and, after each, its tokens (the API's /health shows both)."""
        with self._lock:
            self.active += 1
        try:
            yield
        finally:
            with self._lock:
                self.active -= 1
                self.tokens_generated += len(streamer.generated)

    def start(self, inputs: dict[str, torch.Tensor], gen: GenerationArguments | None = None,
              stop_event: Event | None = None, slot: AbstractContextManager | None = None,
              sink: Callable[[str | None], None] | None = None) -> Generation:
        """Start generating from `inputs` in a worker thread; setting `stop_event` ends it at the next token,
        `slot` (entered by the worker) bounds how many run at once, and `sink` receives the text pieces."""
        return Generation(self, inputs, gen or self.gen, stop_event or Event(), slot or nullcontext(), sink)

    def reply(self, messages: list[dict[str, str]]) -> str:
        """The whole reply to the conversation (which ends with a user message)."""
        return "".join(self.stream(messages))

    def stream(self, messages: list[dict[str, str]]) -> Iterator[str]:
        """Yield the reply piece by piece as tokens are generated."""
        yield from self.start(self._inputs(messages))


def run_repl(engine: ChatEngine, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
    """Interactive chat: history kept between turns; `clear` forgets it, `exit` quits."""
    history: list[dict[str, str]] = []
    stdout.write("Chat with the model. Type `clear` to forget the conversation, `exit` to quit.\n")
    while True:
        stdout.write("\nUser: ")
        stdout.flush()
        line = stdin.readline()
        if not line:
            break
        query = line.strip()
        if query == "exit":
            break
        if query == "clear":
            history = []
            stdout.write("History cleared.\n")
            continue
        if not query:
            continue
        history.append({"role": "user", "content": query})
        while _answer(engine, history, stdin, stdout):  # a tool call: its result is read, then the model goes on
            pass


def _answer(engine: ChatEngine, history: list[dict[str, str]], stdin: TextIO, stdout: TextIO) -> bool:
    """Stream one reply into the history; with --tools, a reply that calls tools is printed as JSON and the
    tool's result read from the terminal (True: the model answers again)."""
    stdout.write("Assistant: ")
    pieces = []
    for piece in engine.stream(history):
        pieces.append(piece)
        stdout.write(piece)
        stdout.flush()
    stdout.write("\n")
    reply = "".join(pieces).strip()
    calls = engine.tool_calls(reply) if engine.tools else None
    if not calls:
        history.append({"role": "assistant", "content": reply})
        return False
    as_json = calls_as_json(calls)
    stdout.write(f"Tool calls: {as_json}\nTool result: ")
    stdout.flush()
    history += [{"role": "function", "content": as_json}, {"role": "observation", "content": stdin.readline().strip()}]
    return True


def calls_as_json(calls: list[Any]) -> str:
    """Parsed tool calls as the JSON a function message holds: [{"name", "arguments"}, ...]."""
    return json.dumps([{"name": c.name, "arguments": json.loads(c.arguments)} for c in calls], ensure_ascii=False)


def read_tools_file(path: str) -> str:
    """The --tools file: a JSON list of tool descriptions, checked, as JSON text."""
    from lmforge.data.tools import parse_tools

    try:
        return json.dumps(parse_tools(Path(path).read_text(encoding="utf-8")), ensure_ascii=False)
    except OSError as err:
        raise LmforgeError(f"tools file {path}: {err.strerror}") from None
    except ValueError as err:  # its message starts with "tools"
        raise LmforgeError(f"{path}: {err}") from None

