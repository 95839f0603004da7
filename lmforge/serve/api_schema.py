"""OpenAI's wire format for `lmforge api`: request models, response and stream chunks, error bodies,
and the stop-string cutting that both streamed and whole replies go through."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ApiError(Exception):
    """A request the server refuses, answered with OpenAI's error body and this HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        """`{"error": {"message", "type", "param", "code"}}`, as OpenAI's API answers errors."""
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error JSON."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class TextPart(BaseModel):
    """One part of a message's content; only text parts can be rendered by a chat template."""

    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """One message of the conversation."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """The content as one string (text parts joined); other part types are refused."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        kinds = {part.type for part in self.content} - {"text"}
        if kinds:
            raise ApiError(400, f"content parts of type {', '.join(sorted(kinds))} are not supported: send text",
                           param="messages")
        return "".join(part.text or "" for part in self.content)


class StreamOptions(BaseModel):
    """`stream_options`: include_usage adds a last chunk with the usage counts."""

    include_usage: bool = False


class SamplingRequest(BaseModel):
    """The fields chat and completion requests share. Unset values fall back to the server's generation
    options (GenerationArguments), so a request without them generates as `lmforge chat` does."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stop_strings(self) -> list[str]:
        """The stop strings as a list (empty strings dropped)."""
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return [s for s in stops if s]

    @property
    def include_usage(self) -> bool:
        """Whether a streamed reply ends with a usage chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[dict[str, Any]] | None = None

    def token_limit(self) -> int | None:
        """max_completion_tokens (OpenAI's newer name) or max_tokens."""
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingRequest):
    """POST /v1/completions: a raw prompt, no chat template."""

    prompt: str | list[str]

    def token_limit(self) -> int | None:
        """max_tokens."""
        return self.max_tokens

    def prompt_text(self) -> str:
        """The one prompt (a list of one is accepted, as the openai client may send it)."""
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ApiError(400, f"one prompt per request, got {len(self.prompt)}", param="prompt")
        return self.prompt[0]


def new_id(prefix: str) -> str:
    """A response id such as chatcmpl-3f2a..."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's usage counts."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event: `data: JSON` and a blank line (`data: [DONE]` ends the stream)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class ChunkFactory:
    """Builds the chunks of one streamed reply, sharing its id, creation time and model."""

    def __init__(self, model: str, chat: bool):
        self.model, self.chat = model, chat
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def delta(self, text: str | None = None, role: str | None = None, finish_reason: str | None = None,
              **extra: Any) -> dict[str, Any]:
        """A chunk carrying text (or, for chat, the role) and, on the last one, the finish reason."""
        if not self.chat:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            return self._chunk([choice], **extra)
        delta = {k: v for k, v in (("role", role), ("content", text)) if v is not None}
        return self._chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}], **extra)

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """The chunk stream_options.include_usage adds after the last one: no choices, the counts."""
        return self._chunk([], usage=usage(prompt_tokens, completion_tokens))

    def tool_delta(self, tool_calls: list[dict[str, Any]]) -> dict[str, Any]:
        """The chunk that carries a streamed reply's tool calls (each whole, with its index)."""
        calls = [{"index": i, **call} for i, call in enumerate(tool_calls)]
        return self._chunk([{"index": 0, "delta": {"tool_calls": calls}, "logprobs": None, "finish_reason": None}])

    def whole(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int,
              tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The non-streamed response; with tool calls the message carries them and no content."""
        if self.chat:
            kind = "chat.completion"
            message = {"role": "assistant", "content": None if tool_calls else text}
            if tool_calls:
                message["tool_calls"] = tool_calls
            choice = {"index": 0, "message": message, "logprobs": None,
                      "finish_reason": "tool_calls" if tool_calls else finish_reason}
        else:
            kind = "text_completion"
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [choice],
                "usage": usage(prompt_tokens, completion_tokens)}


class StopCutter:
    """Cuts streamed text at the first stop string. It holds back a tail that could be the start of a stop
    string, so no piece of a stop string is ever sent; `stopped` tells the caller to end generation."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """The text that is safe to send now."""
        if self.stopped:
            return ""
        text = self.held + piece
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.stopped, self.held = True, ""
            return text[:min(cuts)]
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        """What was held back, once the reply is complete."""
        held, self.held = self.held, ""
        return held


def cut_at_stop(text: str, stops: list[str]) -> str:
    """`text` up to (not including) the first stop string."""
    cutter = StopCutter(stops)
    return cutter.feed(text) + cutter.flush()
