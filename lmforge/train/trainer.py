"""`transformers.Trainer` plus real-token throughput, padding and packing figures in every log."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from transformers import Trainer

from lmforge.data.collator import COUNT_KEYS
from lmforge.train.loss import capture_head_input, chunkable_head, linear_cross_entropy

LARGE_VOCAB = 32_000
logger = logging.getLogger(__name__)


class LmforgeTrainer(Trainer):
    """Counts the tokens each optimizer step really computes and logs, per logging step:
    tokens_per_second (non-padding tokens), padding_fraction, packing_efficiency (packed runs), elapsed_s.

    Loss normalisation is the Trainer's own: with `num_items_in_batch` the loss is the mean over all
    loss tokens of the optimizer step, so gradient accumulation equals one larger batch.
    """

    def __init__(self, *args: Any, pack_size: int | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.pack_size = pack_size
        self.loss_head = self._choose_loss_head()
        self._counts = {"real": 0, "positions": 0, "rows": 0}
        self._last_log = (time.perf_counter(), dict(self._counts))
        self._start = time.perf_counter()

    def _choose_loss_head(self) -> Any:
        """The head for chunked loss, or None for the model's own loss (see `loss_chunking`)."""
        mode = getattr(self.args, "loss_chunking", "off")
        if mode == "off" or self.args.use_liger_kernel or not self.model_accepts_loss_kwargs:
            return None
        head = chunkable_head(self.model)
        if head is None or (mode == "auto" and head.weight.shape[0] < LARGE_VOCAB):
            return None
        logger.info("loss: chunked linear cross-entropy (no [batch, seq, %d] logits)", head.weight.shape[0])
        return head

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if self.loss_head is None or not model.training or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.pop("labels")
        with capture_head_input(self.loss_head) as captured:
            outputs = model(**inputs, use_cache=False)
        loss = linear_cross_entropy(captured["hidden"], self.loss_head, labels, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # as Trainer.compute_loss: the gradient all-reduce averages, the token count was summed
            loss = loss * (self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1 else self.args.n_gpu)
        return (loss, outputs) if return_outputs else loss

    def train(self, *args: Any, **kwargs: Any) -> Any:
        self._start = time.perf_counter()
        self._last_log = (self._start, dict(self._counts))
        return super().train(*args, **kwargs)

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        counts = {k: inputs.pop(k, None) for k in COUNT_KEYS}
        self._counts["real"] += counts["num_real_tokens"] or inputs["input_ids"].numel()
        self._counts["positions"] += counts["num_positions"] or inputs["input_ids"].numel()
        self._counts["rows"] += counts["num_rows"] or inputs["input_ids"].shape[0]
        return super().training_step(model, inputs, num_items_in_batch)

    def prediction_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        for key in COUNT_KEYS:
            inputs.pop(key, None)
        return super().prediction_step(model, inputs, *args, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            now = time.perf_counter()
            since, before = self._last_log
            real = self._counts["real"] - before["real"]
            positions = self._counts["positions"] - before["positions"]
            logs["tokens_per_second"] = round(real / max(now - since, 1e-9), 1)
            logs["padding_fraction"] = round(1 - real / positions, 4) if positions else 0.0
            rows = self._counts["rows"] - before["rows"]
            if self.pack_size and rows:
                logs["packing_efficiency"] = round(real / (rows * self.pack_size), 4)
            logs["elapsed_s"] = round(now - self._start, 2)
            self._last_log = (now, dict(self._counts))
        super().log(logs, start_time)
