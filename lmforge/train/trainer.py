"""`transformers.Trainer` plus real-token throughput in every training log."""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers import Trainer


class LmforgeTrainer(Trainer):
    """Counts the non-padding tokens each optimizer step sees and logs tokens/s and elapsed time.

    Loss normalisation is the Trainer's own: with `num_items_in_batch` the loss is the mean over all
    loss tokens of the optimizer step, so gradient accumulation equals one larger batch.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._real_tokens = 0
        self._last_log = (time.perf_counter(), 0)
        self._start = time.perf_counter()

    def train(self, *args: Any, **kwargs: Any) -> Any:
        self._start = time.perf_counter()
        self._last_log = (self._start, self._real_tokens)
        return super().train(*args, **kwargs)

    def training_step(self, model: Any, inputs: dict[str, torch.Tensor], num_items_in_batch: Any = None) -> torch.Tensor:
        mask = inputs.get("attention_mask")
        self._real_tokens += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        return super().training_step(model, inputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            now = time.perf_counter()
            since, tokens = self._last_log
            logs["tokens_per_second"] = round((self._real_tokens - tokens) / max(now - since, 1e-9), 1)
            logs["elapsed_s"] = round(now - self._start, 2)
            self._last_log = (now, self._real_tokens)
        super().log(logs, start_time)
