"""Generation: reply to every row's prompt, then score the replies against the rows' references.

The rows come from the training pipeline (same template, masking and cutoff_len), so the prompt is exactly
the tokens before the last trained reply and the reference is that reply. Generation is batched with left
padding (every prompt ends where generation starts), greedy unless temperature > 0, and stops at the
template's stop tokens.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.data.processors import IGNORE_INDEX
from lmforge.errors import LmforgeError
from lmforge.eval.metrics import score_generations
from lmforge.eval.progress import progress_bar


@dataclass(frozen=True)
class GenerationRow:
    """One prompt (token ids, as training rendered it) and the reference reply that follows it."""

    prompt_ids: list[int]
    reference: str


def split_last_reply(input_ids: list[int], labels: list[int]) -> tuple[int, int] | None:
    """(start, end) token span of the last trained reply, or None when no token carries a label."""
    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    if not trained:
        return None
    end = trained[-1] + 1
    start = end - 1
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start, end


def generation_rows(rows: Any, tokenizer: Any) -> list[GenerationRow]:
    """The prompt and reference of every tokenized sft row (its last trained reply is the reference)."""
    out = []
    for index, (ids, labels) in enumerate(zip(rows["input_ids"], rows["labels"])):
        span = split_last_reply(ids, labels)
        if span is None or span[0] == 0:
            raise LmforgeError(f"generation: eval row {index} has no prompt before its reply; generation needs "
                               "sft rows (a user turn, then the reference reply)")
        reference = tokenizer.decode(ids[span[0]:span[1]], skip_special_tokens=True).strip()
        out.append(GenerationRow(list(ids[:span[0]]), reference))
    return out


def left_pad(prompts: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """(B, T) input_ids and attention_mask with padding on the left, so every prompt ends at column T."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = torch.as_tensor(prompt, dtype=torch.long)
        mask[i, width - len(prompt):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def cut_at_stop_words(text: str, stop_words: tuple[str, ...]) -> str:
    """The text before the first stop word (stop words of several tokens are not stopped on by generate)."""
    cuts = [text.find(w) for w in stop_words if w and w in text]
    return (text[:min(cuts)] if cuts else text).strip()


@dataclass
class Generator:
    """Batched generation with a model, its tokenizer and the template's stop tokens."""

    model: Any
    tokenizer: Any
    stop_ids: list[int]
    stop_words: tuple[str, ...]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 0.9
    repetition_penalty: float = 1.0

    def _kwargs(self) -> dict[str, Any]:
        sampling = self.temperature > 0
        return {"max_new_tokens": self.max_new_tokens, "do_sample": sampling, "eos_token_id": self.stop_ids,
                "pad_token_id": self.tokenizer.pad_token_id, "repetition_penalty": self.repetition_penalty,
                "temperature": self.temperature if sampling else None, "top_p": self.top_p if sampling else None,
                "top_k": None}

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]]) -> list[str]:
        """The reply to each prompt (token ids), decoded without special tokens."""
        batch = {k: v.to(self.model.device) for k, v in left_pad(prompts, self.tokenizer.pad_token_id).items()}
        out = self.model.generate(**batch, **self._kwargs())  # (B, T + new)
        new = out[:, batch["input_ids"].shape[1]:]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [cut_at_stop_words(t, self.stop_words) for t in texts]


def generate_all(generator: Generator, rows: list[GenerationRow], batch_size: int) -> list[str]:
    """Predictions in row order; rows are batched by prompt length, longest first, to pad little."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].prompt_ids))
    predictions: list[str] = [""] * len(rows)
    with progress_bar(len(rows), "generation") as bar:
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            for i, text in zip(chosen, generator.generate([rows[i].prompt_ids for i in chosen])):
                predictions[i] = text
            bar.update(len(chosen))
    return predictions


def write_predictions(path: Path, prompts: list[str], rows: list[GenerationRow], predictions: list[str]) -> None:
    """generated_predictions.jsonl: one {prompt, reference, prediction} object per row."""
    with path.open("w", encoding="utf-8") as f:
        for prompt, row, prediction in zip(prompts, rows, predictions):
            f.write(json.dumps({"prompt": prompt, "reference": row.reference, "prediction": prediction},
                               ensure_ascii=False) + "\n")


def evaluate_generation(generator: Generator, rows: list[GenerationRow], batch_size: int,
                        output_dir: Path) -> dict[str, Any]:
    """Generate for every row, write generated_predictions.jsonl, return the scores (and rows/s of generation)."""
    start = time.perf_counter()
    predictions = generate_all(generator, rows, batch_size)
    seconds = time.perf_counter() - start
    prompts = generator.tokenizer.batch_decode([r.prompt_ids for r in rows], skip_special_tokens=False)
    write_predictions(output_dir / "generated_predictions.jsonl", prompts, rows, predictions)
    scores = score_generations(predictions, [r.reference for r in rows])
    return {**scores, "rows": len(rows), "rows_per_second": round(len(rows) / max(seconds, 1e-9), 3)}
