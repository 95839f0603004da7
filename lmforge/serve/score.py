"""`lmforge score`: a reward model's score for each (prompt, response) row of a file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from lmforge.config.args import ScoreArguments
from lmforge.data.formats import RowError, split_system
from lmforge.data.loader import locate_bad_line
from lmforge.data.pairwise import answer_text, prompt_messages, validate_prompt
from lmforge.errors import LmforgeError
from lmforge.model.adapters import inference_device
from lmforge.train.rewards import RewardModelScorer


def read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) of a JSON-lines file, or (index + 1, row) of a JSON list."""
    if not path.is_file():
        raise LmforgeError(f"input {path} not found")
    locate_bad_line(path, "json")  # malformed JSON stops here, naming file and line
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        yield from enumerate(json.loads(text), start=1)
        return
    yield from ((number, json.loads(line)) for number, line in enumerate(text.splitlines(), start=1) if line.strip())


def conversation(row: Any) -> tuple[str, list[dict[str, str]], str]:
    """(system, prompt turns, response) of a prompt/response row or a messages row."""
    if not isinstance(row, dict):
        raise RowError("a row must be a JSON object")
    if "messages" in row:
        messages = prompt_messages(row["messages"])
        if not messages or messages[-1]["role"] != "assistant":
            raise RowError("the last message must be the assistant's response to score")
        response, messages = messages[-1]["content"], messages[:-1]
    else:
        if "prompt" not in row or not ({"response", "completion"} & row.keys()):
            raise RowError("expected prompt with response (or completion), or messages")
        messages = prompt_messages(row["prompt"])
        response = answer_text(row.get("response", row.get("completion")), "response")
    system, messages = split_system(messages)
    validate_prompt(messages)
    return system, messages, response


def run_score(args: ScoreArguments) -> Path:
    """Score every row and write them, each with its `score`, to args.output; returns that path."""
    source = Path(args.input)
    target = Path(args.output) if args.output else source.with_name(source.stem + ".scored.jsonl")
    if target.exists():
        raise LmforgeError(f"output {target} exists: choose another --output (nothing is overwritten)")
    rows, sequences = [], []
    scorer = RewardModelScorer(args.reward_model, args.template, device=inference_device(args.device),
                               batch_size=args.batch_size)
    for number, row in read_rows(source):
        try:
            sequences.append(scorer.encode(*conversation(row)))
        except RowError as err:
            raise LmforgeError(f"{source}:{number}: {err}") from None
        rows.append(row)
    scores = scorer.score(sequences)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("x", encoding="utf-8") as out:
        for row, score in zip(rows, scores):
            out.write(json.dumps({**row, "score": score}, ensure_ascii=False) + "\n")
    return target
