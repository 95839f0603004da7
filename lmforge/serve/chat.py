"""Generate replies with a trained model: one-shot or streamed, rendered by the training templates."""

from __future__ import annotations

import sys
from threading import Thread
from typing import Any, Iterator, TextIO

import torch

from lmforge.config import GenerationArguments, ModelArguments
from lmforge.data.templates import get_template, stop_token_ids
from lmforge.errors import LmforgeError
from lmforge.model.adapters import fill_base_model, load_merged

DEFAULT_MODEL = "smollm2-135m-instruct"


def load_for_inference(model_args: ModelArguments) -> tuple[Any, Any]:
    """Tokenizer and model in eval mode; LoRA adapters applied (all merged but kept exact)."""
    fill_base_model(model_args, default=DEFAULT_MODEL)
    return load_merged(model_args)


class ChatEngine:
    """Holds tokenizer, model and template; turns a message list into a reply."""

    def __init__(self, tokenizer: Any, model: Any, gen: GenerationArguments):
        self.tokenizer, self.model, self.gen = tokenizer, model, gen
        self.template = get_template(gen.template, tokenizer)
        self.stop_ids = stop_token_ids(tokenizer, self.template)

    def _inputs(self, messages: list[dict[str, str]]) -> dict[str, torch.Tensor]:
        prompt = self.template.render_prompt(self.gen.system or "", messages)
        enc = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        return {k: v.to(self.model.device) for k, v in enc.items()}

    def _generate_kwargs(self) -> dict[str, Any]:
        g = self.gen
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

    def reply(self, messages: list[dict[str, str]]) -> str:
        """The whole reply to the conversation (which ends with a user message)."""
        return "".join(self.stream(messages))

    def stream(self, messages: list[dict[str, str]]) -> Iterator[str]:
        """Yield the reply piece by piece as tokens are generated."""
        from transformers import TextIteratorStreamer, set_seed

        set_seed(self.gen.seed)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = {**self._inputs(messages), **self._generate_kwargs(), "streamer": streamer}
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(**kwargs)
            except BaseException as err:  # surfaced in the caller's thread below
                errors.append(err)
                streamer.end()

        thread = Thread(target=run, daemon=True)
        thread.start()
        for piece in streamer:
            if piece:
                yield piece
        thread.join()
        if errors:
            raise LmforgeError(f"generation failed: {errors[0]}")


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
        stdout.write("Assistant: ")
        pieces = []
        for piece in engine.stream(history):
            pieces.append(piece)
            stdout.write(piece)
            stdout.flush()
        stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(pieces).strip()})

