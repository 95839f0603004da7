"""Perplexity: the next-token loss on exactly the tokens training takes loss on.

The rows are tokenized and masked by the training pipeline itself (`build_datasets`), so a pt block or
an sft conversation carries the same labels as in `lmforge train`. Two figures are reported:

- `eval_loss` is the Trainer's definition, so that it equals `eval_loss` of `lmforge train` on the same rows
  with `batch_size` equal to train's `per_device_eval_batch_size`: each batch's loss is the mean over its
  loss tokens, and the batches are averaged weighted by their number of rows. The batches hold the rows the
  Trainer puts together: under train_sampling_strategy group_by_length (lmforge's default) its eval loop
  groups rows of similar length with a sampler seeded by `seed`, which `batch_order` repeats.
  `perplexity` is exp(eval_loss), as train reports it.
- `token_loss` is the mean over all loss tokens (independent of batching); `token_perplexity` = exp of it.
  The two are equal when every batch holds the same number of loss tokens (pt blocks, for instance).
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from lmforge.data.processors import IGNORE_INDEX
from lmforge.eval.progress import progress_bar


def batch_order(rows: Any, batch_size: int, grouped: bool, seed: int) -> list[int]:
    """The row order of the Trainer's eval loop: its LengthGroupedSampler when grouped, else dataset order."""
    if not grouped:
        return list(range(len(rows)))
    from transformers.trainer_pt_utils import LengthGroupedSampler

    lengths = [len(ids) for ids in rows["input_ids"]]
    return list(LengthGroupedSampler(batch_size, lengths=lengths, generator=torch.Generator().manual_seed(seed)))


def padded_batches(rows: Any, batch_size: int, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded (B, T) input_ids, attention_mask and labels (-100 on padding), in dataset order."""
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        ids, labels = chunk["input_ids"], chunk["labels"]
        width = max(len(r) for r in ids)
        batch = {"input_ids": torch.full((len(ids), width), pad_id), "attention_mask": torch.zeros(len(ids), width,
                 dtype=torch.long), "labels": torch.full((len(ids), width), IGNORE_INDEX)}
        for i, (row_ids, row_labels) in enumerate(zip(ids, labels)):
            n = len(row_ids)
            batch["input_ids"][i, :n] = torch.as_tensor(row_ids)
            batch["attention_mask"][i, :n] = 1
            batch["labels"][i, :n] = torch.as_tensor(row_labels)
        yield batch


@torch.inference_mode()
def batch_loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """(summed next-token cross-entropy, number of loss tokens) of one batch, in float32."""
    batch = {k: v.to(model.device) for k, v in batch.items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    targets = batch["labels"][:, 1:]  # position t predicts token t + 1
    total, count = 0.0, 0
    for row_logits, row_targets in zip(logits[:, :-1], targets):  # one row at a time: one (T, V) float32 copy
        keep = row_targets != IGNORE_INDEX
        if keep.any():
            total += F.cross_entropy(row_logits[keep].float(), row_targets[keep], reduction="sum").item()
            count += int(keep.sum())
    return total, count


def evaluate_perplexity(model: Any, rows: Any, batch_size: int, pad_id: int, grouped: bool = True,
                        seed: int = 42) -> dict[str, Any]:
    """eval_loss (Trainer's batch-weighted mean), token_loss (per token) and their perplexities."""
    rows = rows.select(batch_order(rows, batch_size, grouped, seed))
    weighted, loss_sum, loss_tokens = 0.0, 0.0, 0
    with progress_bar(len(rows), "perplexity") as bar:
        for batch in padded_batches(rows, batch_size, pad_id):
            total, count = batch_loss_sum(model, batch)
            n_rows = batch["input_ids"].shape[0]
            weighted += n_rows * total / max(count, 1)
            loss_sum, loss_tokens = loss_sum + total, loss_tokens + count
            bar.update(n_rows)
    eval_loss = weighted / max(len(rows), 1)
    token_loss = loss_sum / max(loss_tokens, 1)
    return {"eval_loss": round(eval_loss, 6), "perplexity": round(_exp(eval_loss), 4),
            "token_loss": round(token_loss, 6), "token_perplexity": round(_exp(token_loss), 4),
            "rows": len(rows), "loss_tokens": loss_tokens, "batch_size": batch_size}


def _exp(value: float) -> float:
    return math.exp(value) if value < 700 else float("inf")
