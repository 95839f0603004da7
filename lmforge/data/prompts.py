"""Prompt rows for on-policy RL (grpo): the conversation up to the user's last turn, rendered with the chat
template and its generation prompt, plus an optional reference `answer` for the rewards.

Accepted rows:
- prompt (/ answer): `prompt` a string or a list of messages;
- alpaca: instruction / input (/ history / system); `output` (or an `answer` column) is the reference answer;
- sharegpt / openai: a conversation; a last assistant turn is the reference answer, not part of the prompt.

Columns the format does not use are kept, so that `module:function` rewards receive them as keyword lists
(TRL's convention), beside `answer`, `prompt_length` (tokens) and `_system` / `_messages` (the prompt turns).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import datasets

from lmforge.data.catalogue import DatasetSpec
from lmforge.data.formats import (
    TURN_FEATURES,
    _text,
    alpaca_converter,
    convert_rows,
    detect_turn_format,
    fill_turns,
    require_columns,
    sharegpt_converter,
    split_system,
)
from lmforge.data.pairwise import prompt_messages, validate_prompt
from lmforge.data.processors import Status
from lmforge.data.templates import Renderer, bind_template

PromptConverter = Callable[[dict[str, Any]], tuple[str, list[dict[str, str]], str]]
PROMPT_FEATURES = {**TURN_FEATURES, "answer": datasets.Value("string")}


def reference_answer(row: dict[str, Any], column: str | None) -> str:
    """The row's reference answer as text (numbers, as in many math sets, become their decimal form)."""
    value = row.get(column) if column else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return _text(value, column or "answer")


def prompt_converter(spec: DatasetSpec, present: list[str]) -> tuple[PromptConverter, set[str]]:
    """The converter for a prompt dataset's format, and the columns it consumes."""
    formatting = detect_turn_format(spec, present)
    answer_col = spec.columns.get("answer", "answer")
    answer_col = answer_col if answer_col in present else None
    if formatting == "prompt":
        prompt_col, system_col = spec.columns.get("prompt", "prompt"), spec.columns.get("system")
        require_columns(spec, {"prompt": prompt_col, "system": system_col}, present)

        def convert(row: dict[str, Any]) -> tuple[str, list[dict[str, str]], str]:
            system, messages = split_system(prompt_messages(row.get(prompt_col)),
                                            _text(row.get(system_col), system_col) if system_col else "")
            return system, messages, reference_answer(row, answer_col)

        return convert, {c for c in (prompt_col, system_col, answer_col) if c}
    if formatting == "alpaca":
        if "response" not in spec.columns and spec.column("response") not in present:
            spec.columns["response"] = None  # prompt-only alpaca rows: no output column
        base = alpaca_converter(spec, present)
        consumed = {spec.column(k) or k for k in ("prompt", "query", "response", "history", "system")}
    else:
        base = sharegpt_converter(spec, present)
        consumed = {spec.columns.get("messages", "messages" if formatting == "openai" else "conversations"),
                    spec.column("system")}
    consumed.add(answer_col)

    def convert(row: dict[str, Any]) -> tuple[str, list[dict[str, str]], str]:
        system, messages = base(row)
        reference = ""
        if messages and messages[-1]["role"] == "assistant":
            reference = messages.pop()["content"]
        if answer_col:
            reference = reference_answer(row, answer_col)
        return system, messages, reference

    return convert, {c for c in consumed if c and c in present}


def to_prompts(ds: datasets.Dataset, spec: DatasetSpec, num_proc: int | None = None,
               placeholders: dict[str, str] | None = None, skip_invalid: bool = False) -> datasets.Dataset:
    """Rows -> `_system`, `_messages`, `answer`, `_invalid` and the columns the format does not use."""
    present = list(ds.column_names)
    convert, consumed = prompt_converter(spec, present)
    kept = {k: v for k, v in ds.features.items() if k not in consumed and k not in PROMPT_FEATURES}

    def prompt(row: dict[str, Any], fill: Callable[[str], str]) -> dict[str, Any]:
        system, messages, answer = convert(row)
        messages = fill_turns(messages, fill)
        validate_prompt(messages)
        return {"_system": fill(system), "_messages": messages, "answer": answer}

    empty = {"_system": "", "_messages": [], "answer": ""}
    return convert_rows(ds, spec, prompt, {**kept, **PROMPT_FEATURES}, empty, sorted(consumed), num_proc,
                        placeholders, skip_invalid)


def encode_prompts_batch(batch: dict[str, list[Any]], tokenizer: Any, template: Renderer,
                         cutoff_len: int) -> dict[str, list[Any]]:
    """Batched map: -> `prompt` (the rendered text, generation prompt included) and `prompt_length`; a
    prompt longer than cutoff_len tokens drops the row (prompts are never cut: the question would change)."""
    out: dict[str, list[Any]] = {k: [] for k in ("prompt", "prompt_length", "_status", "_loss_tokens")}
    for system, messages in zip(batch["_system"], batch["_messages"]):
        text = template.render_prompt(system or "", messages)
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        out["prompt"].append(text)
        out["prompt_length"].append(n)
        out["_status"].append(Status.DROPPED if n > cutoff_len else Status.KEPT)
        out["_loss_tokens"].append(0)  # the trained tokens are sampled during training
    return out


def prompts_encoder(args: Any, tokenizer: Any) -> Callable[[dict[str, list[Any]]], dict[str, list[Any]]]:
    """The registry's batched tokenizer for these rows: `encode_prompts_batch` with the template and cutoff_len."""
    return bind_template(partial(encode_prompts_batch, tokenizer=tokenizer), args, tokenizer)
