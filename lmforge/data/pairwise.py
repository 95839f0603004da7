"""Preference pairs: rows -> `_system`, `_messages` (the prompt turns), `_chosen`, `_rejected`, then
token ids rendered with the chat template and masked exactly as SFT masks the last assistant turn.

Accepted rows (LLaMA-Factory's `ranking: true` datasets and TRL's common format):
- alpaca: instruction / input (/ history / system) with `chosen` and `rejected` strings;
- sharegpt / openai: the conversation up to the last user turn, with `chosen` and `rejected` as a
  message ({"from": "gpt", "value": ...}) or a string;
- prompt / chosen / rejected: `prompt` a string or a list of messages, `chosen` / `rejected` a string
  or a list whose last message is the assistant's.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import datasets
import numpy as np

from lmforge.data.catalogue import DatasetSpec
from lmforge.data.formats import (
    TURN_FEATURES,
    RowError,
    _text,
    alpaca_converter,
    convert_rows,
    detect_turn_format,
    fill_turns,
    require_columns,
    sharegpt_converter,
    split_system,
)
from lmforge.data.processors import IGNORE_INDEX, MaskPolicy, Status, encode_conversation
from lmforge.data.templates import Renderer, bind_template

PairConverter = Callable[[dict[str, Any]], tuple[str, list[dict[str, str]], str, str]]
PAIR_FEATURES = {**TURN_FEATURES, "_chosen": datasets.Value("string"), "_rejected": datasets.Value("string")}


def answer_text(value: Any, what: str, tag: Callable[[str], str] | None = None) -> str:
    """A response given as a string, a message dict, or a list ending with the assistant's message."""
    if isinstance(value, list):
        if not value:
            raise RowError(f"'{what}' is an empty list")
        value = value[-1]
    if isinstance(value, dict):
        key = tag("content_tag") if tag else "content"
        for candidate in (key, "content", "value"):
            if candidate in value:
                return _text(value[candidate], what)
        raise RowError(f"'{what}' message has no '{key}' key")
    return _text(value, what)


def prompt_messages(value: Any) -> list[dict[str, str]]:
    """`prompt` of the common format: a string (one user turn) or a list of role/content messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        raise RowError("'prompt' must be a string or a list of {role, content} messages")
    return [{"role": m["role"], "content": _text(m["content"], "prompt content")} for m in value]


def pair_converter(spec: DatasetSpec, present: list[str]) -> PairConverter:
    """The converter for a pairwise dataset's format (detected from the columns when not named)."""
    chosen_col, rejected_col = spec.columns.get("chosen", "chosen"), spec.columns.get("rejected", "rejected")
    require_columns(spec, {"chosen": chosen_col, "rejected": rejected_col}, present)
    formatting = detect_turn_format(spec, present)
    if formatting == "prompt":
        require_columns(spec, {"prompt": spec.columns.get("prompt", "prompt")}, present)
        prompt_col, system_col = spec.columns.get("prompt", "prompt"), spec.columns.get("system")

        def convert(row: dict[str, Any]) -> tuple[str, list[dict[str, str]], str, str]:
            system, messages = split_system(prompt_messages(row.get(prompt_col)),
                                            _text(row.get(system_col), system_col) if system_col else "")
            return system, messages, answer_text(row.get(chosen_col), "chosen"), answer_text(row.get(rejected_col), "rejected")

        return convert
    if formatting == "alpaca":
        spec.columns.setdefault("response", chosen_col)  # the prompt side is read as a one-turn alpaca row
        base = alpaca_converter(spec, present)

        def convert(row: dict[str, Any]) -> tuple[str, list[dict[str, str]], str, str]:
            system, messages = base(row)
            return system, messages[:-1], answer_text(row.get(chosen_col), "chosen"), answer_text(row.get(rejected_col), "rejected")

        return convert
    base = sharegpt_converter(spec, present)

    def convert(row: dict[str, Any]) -> tuple[str, list[dict[str, str]], str, str]:
        system, messages = base(row)
        return (system, messages, answer_text(row.get(chosen_col), "chosen", spec.tag),
                answer_text(row.get(rejected_col), "rejected", spec.tag))

    return convert


def validate_prompt(messages: list[dict[str, str]]) -> None:
    """A non-empty prompt that alternates user/assistant and ends with a user turn."""
    if not messages or not any(m["content"].strip() for m in messages if m["role"] == "user"):
        raise RowError("empty prompt")
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise RowError(f"prompt turn {i + 1} is '{message['role']}' but '{expected}' was expected "
                           "(the prompt alternates user, assistant and ends with a user turn)")
    if messages[-1]["role"] != "user":
        raise RowError("the prompt must end with a user turn")


def validate_pair(messages: list[dict[str, str]], chosen: str, rejected: str) -> None:
    """A valid prompt (`validate_prompt`) and two different non-empty answers."""
    validate_prompt(messages)
    if not chosen.strip():
        raise RowError("empty chosen response")
    if not rejected.strip():
        raise RowError("empty rejected response")
    if chosen.strip() == rejected.strip():
        raise RowError("chosen and rejected are identical")


def to_pairs(ds: datasets.Dataset, spec: DatasetSpec, num_proc: int | None = None,
             placeholders: dict[str, str] | None = None, skip_invalid: bool = False) -> datasets.Dataset:
    """Rows -> `_system`, `_messages`, `_chosen`, `_rejected`, `_invalid` (see `to_conversations`)."""
    present = list(ds.column_names)
    convert = pair_converter(spec, present)

    def pair(row: dict[str, Any], fill: Callable[[str], str]) -> dict[str, Any]:
        system, messages, chosen, rejected = convert(row)
        messages = fill_turns(messages, fill)
        validate_pair(messages, chosen, rejected)
        return {"_system": fill(system), "_messages": messages, "_chosen": fill(chosen), "_rejected": fill(rejected)}

    empty = {"_system": "", "_messages": [], "_chosen": "", "_rejected": ""}
    return convert_rows(ds, spec, pair, PAIR_FEATURES, empty, present, num_proc, placeholders, skip_invalid)


def answer_tokens(template: Renderer, tokenizer: Any, system: str, messages: list[dict[str, str]],
                   answer: str) -> tuple[list[int], int, int]:
    """(ids, first trained index, end of the trained span) of the prompt plus `answer` as the last turn."""
    rendered = template.render(system, [*messages, {"role": "assistant", "content": answer}])
    enc = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    policy = MaskPolicy(cutoff_len=None, mask_history=True)  # cut later, for both answers alike
    ids, labels, _ = encode_conversation(rendered, enc["input_ids"], enc["offset_mapping"], policy)
    trained = np.nonzero(np.asarray(labels) != IGNORE_INDEX)[0]
    return ids, int(trained[0]), int(trained[-1]) + 1


def fit_cutoff(prompt: list[int], answers: list[list[int]], cutoff_len: int) -> tuple[list[int], list[list[int]], Status]:
    """(prompt, answers, status) within cutoff_len: a prompt of cutoff_len tokens or more drops the row
    (every part emptied); otherwise each answer is cut to the room the prompt leaves."""
    if len(prompt) >= cutoff_len:
        return [], [[] for _ in answers], Status.DROPPED
    room = cutoff_len - len(prompt)
    if max(len(a) for a in answers) > room:
        return prompt, [a[:room] for a in answers], Status.TRUNCATED
    return prompt, answers, Status.KEPT


def encode_pairs_batch(batch: dict[str, list[Any]], tokenizer: Any, template: Renderer,
                       cutoff_len: int) -> dict[str, list[Any]]:
    """Batched map: pairs -> prompt_ids, chosen_ids, rejected_ids. The prompt is the common prefix of
    both renders up to the first trained token; each answer runs to the end of its trained span (the
    turn's end token included, the template's trailing newline not). When prompt + the longer answer
    exceed cutoff_len, both answers are cut; a prompt of cutoff_len or more drops the pair."""
    out: dict[str, list[Any]] = {k: [] for k in ("prompt_ids", "chosen_ids", "rejected_ids", "_status", "_loss_tokens")}
    for system, messages, chosen, rejected in zip(batch["_system"], batch["_messages"], batch["_chosen"],
                                                  batch["_rejected"]):
        c_ids, c_start, c_end = answer_tokens(template, tokenizer, system or "", messages, chosen)
        r_ids, r_start, r_end = answer_tokens(template, tokenizer, system or "", messages, rejected)
        shared = next((i for i, (a, b) in enumerate(zip(c_ids, r_ids)) if a != b), min(len(c_ids), len(r_ids)))
        p = min(c_start, r_start, shared)
        prompt, (chosen_ids, rejected_ids), status = fit_cutoff(c_ids[:p], [c_ids[p:c_end], r_ids[p:r_end]],
                                                                cutoff_len)
        out["prompt_ids"].append(prompt)
        out["chosen_ids"].append(chosen_ids)
        out["rejected_ids"].append(rejected_ids)
        out["_status"].append(status)
        out["_loss_tokens"].append(len(chosen_ids) + len(rejected_ids))
    return out


def pairs_encoder(args: Any, tokenizer: Any) -> Callable[[dict[str, list[Any]]], dict[str, list[Any]]]:
    """The registry's batched tokenizer for these rows: `encode_pairs_batch` with the template and cutoff_len."""
    return bind_template(partial(encode_pairs_batch, tokenizer=tokenizer), args, tokenizer)
