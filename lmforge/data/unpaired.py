"""KTO rows: one response per prompt, labelled desirable (true) or undesirable (false).

Rows -> `_system`, `_messages` (the prompt turns), `_completion`, `_label`, then `prompt_ids`,
`completion_ids`, `label`, rendered with the chat template and masked as SFT masks the last turn.

Accepted rows:
- prompt / completion / label (TRL's unpaired format): `prompt` a string or a list of messages,
  `completion` a string or a list ending with the assistant's message;
- LLaMA-Factory's KTO datasets: sharegpt / openai conversations (or alpaca rows) whose last turn is the
  assistant's, with the label in the column that `columns.kto_tag` names (default `label`, else `kto_tag`).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import datasets

from lmforge.data.catalogue import DatasetSpec
from lmforge.data.formats import (
    TURN_FEATURES,
    RowError,
    alpaca_converter,
    convert_rows,
    detect_turn_format,
    fill_turns,
    require_columns,
    sharegpt_converter,
    split_system,
)
from lmforge.data.pairwise import answer_text, answer_tokens, fit_cutoff, prompt_messages, validate_prompt
from lmforge.data.templates import Renderer, bind_template

UnpairedConverter = Callable[[dict[str, Any]], tuple[str, list[dict[str, str]], str, bool]]
UNPAIRED_FEATURES = {**TURN_FEATURES, "_completion": datasets.Value("string"), "_label": datasets.Value("bool")}
LABEL_WORDS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def parse_label(value: Any, column: str) -> bool:
    """true/false, 1/0 (also as strings) -> bool; anything else is a row error."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in LABEL_WORDS:
        return LABEL_WORDS[value.strip().lower()]
    raise RowError(f"'{column}' must be true or false (desirable or not), got {value!r}")


def unpaired_converter(spec: DatasetSpec, present: list[str]) -> UnpairedConverter:
    """The converter for a KTO dataset's format (detected from the columns when not named)."""
    label_col = spec.columns.get("kto_tag") or ("label" if "label" in present else "kto_tag")
    require_columns(spec, {"kto_tag": label_col}, present)
    formatting = detect_turn_format(spec, present)
    if formatting == "prompt":
        prompt_col, completion_col = spec.columns.get("prompt", "prompt"), spec.columns.get("completion", "completion")
        require_columns(spec, {"prompt": prompt_col, "completion": completion_col}, present)

        def convert(row: dict[str, Any]) -> tuple[str, list[dict[str, str]], str, bool]:
            system, messages = split_system(prompt_messages(row.get(prompt_col)))
            return system, messages, answer_text(row.get(completion_col), "completion"), parse_label(row.get(label_col),
                                                                                                 label_col)

        return convert
    base = alpaca_converter(spec, present) if formatting == "alpaca" else sharegpt_converter(spec, present)

    def convert(row: dict[str, Any]) -> tuple[str, list[dict[str, str]], str, bool]:
        system, messages = base(row)
        if not messages or messages[-1]["role"] != "assistant":
            raise RowError("the last turn must be the assistant's response that the label judges")
        return system, messages[:-1], messages[-1]["content"], parse_label(row.get(label_col), label_col)

    return convert


def to_unpaired(ds: datasets.Dataset, spec: DatasetSpec, num_proc: int | None = None,
                placeholders: dict[str, str] | None = None, skip_invalid: bool = False) -> datasets.Dataset:
    """Rows -> `_system`, `_messages`, `_completion`, `_label`, `_invalid` (see `to_conversations`)."""
    present = list(ds.column_names)
    convert = unpaired_converter(spec, present)

    def labelled(row: dict[str, Any], fill: Callable[[str], str]) -> dict[str, Any]:
        system, messages, completion, label = convert(row)
        messages = fill_turns(messages, fill)
        validate_prompt(messages)
        if not completion.strip():
            raise RowError("empty completion")
        return {"_system": fill(system), "_messages": messages, "_completion": fill(completion), "_label": label}

    empty = {"_system": "", "_messages": [], "_completion": "", "_label": False}
    return convert_rows(ds, spec, labelled, UNPAIRED_FEATURES, empty, present, num_proc, placeholders, skip_invalid)


def encode_unpaired_batch(batch: dict[str, list[Any]], tokenizer: Any, template: Renderer,
                          cutoff_len: int) -> dict[str, list[Any]]:
    """Batched map: rows -> prompt_ids, completion_ids (the trained span of the last turn), label. A
    prompt of cutoff_len tokens or more drops the row; otherwise the completion is cut to fit."""
    out: dict[str, list[Any]] = {k: [] for k in ("prompt_ids", "completion_ids", "label", "_status", "_loss_tokens")}
    for system, messages, completion, label in zip(batch["_system"], batch["_messages"], batch["_completion"],
                                                   batch["_label"]):
        ids, start, end = answer_tokens(template, tokenizer, system or "", messages, completion)
        prompt, (answer,), status = fit_cutoff(ids[:start], [ids[start:end]], cutoff_len)
        out["prompt_ids"].append(prompt)
        out["completion_ids"].append(answer)
        out["label"].append(bool(label))
        out["_status"].append(status)
        out["_loss_tokens"].append(len(answer))
    return out


def unpaired_encoder(args: Any, tokenizer: Any) -> Callable[[dict[str, list[Any]]], dict[str, list[Any]]]:
    """The registry's batched tokenizer for these rows: `encode_unpaired_batch` with the template and cutoff_len."""
    return bind_template(partial(encode_unpaired_batch, tokenizer=tokenizer), args, tokenizer)
