"""The pt and sft recipe: setup -> trainer -> train -> save -> report.

pt and sft differ only in how the data is tokenized (blocks vs. masked conversations, chosen by the
stage registry); the rest is one next-token-loss recipe.
"""

from __future__ import annotations

import logging
from typing import Any

from lmforge.config import TrainConfig
from lmforge.data.collator import PackedCollator, PaddingCollator
from lmforge.data.pipeline import with_length_column
from lmforge.data.shard_reader import TokenBlocks
from lmforge.model.varlen import use_varlen_sdpa
from lmforge.train.recipe import build_model, finish_trainer, prepare_run, train_and_report, trainer_callbacks
from lmforge.train.trainer import LmforgeTrainer

logger = logging.getLogger(__name__)


def build_trainer(config: TrainConfig, tokenizer: Any, data: Any, model: Any,
                  fingerprint: dict[str, Any]) -> LmforgeTrainer:
    """The trainer with lmforge's collator (padded or packed), logs and progress bar."""
    args = config.training
    packed = "lengths" in (data.train.column_names or [])
    attention = config.model.attn_implementation
    if packed and attention == "sdpa":
        attention = use_varlen_sdpa(model)
        logger.info("attention: %s", "packed examples run as separate causal sdpa calls (no cross-example scores)"
                    if attention != "sdpa" else "packed rows with a block-diagonal mask (this model's attention "
                    "cannot be swapped for variable-length sdpa)")
    collator = (PackedCollator(tokenizer.pad_token_id, attention) if packed
                else PaddingCollator(tokenizer.pad_token_id, causal_mask_only=True))
    args.remove_unused_columns = False  # the collators take what they need (`lengths` included)
    if args.train_sampling_strategy == "group_by_length" and isinstance(data.train, TokenBlocks):
        args.train_sampling_strategy = "random"  # blocks of one length: grouping them would read every block
    elif args.train_sampling_strategy == "group_by_length" and not config.data.streaming:
        data.train = with_length_column(data.train)
    return finish_trainer(LmforgeTrainer(
        model=model, args=args, train_dataset=data.train, eval_dataset=data.eval, processing_class=tokenizer,
        data_collator=collator, callbacks=trainer_callbacks(config), pack_size=config.data.cutoff_len if packed
        else None, fingerprint=fingerprint, nan_policy=args.nan_policy,
    ))


def run(config: TrainConfig) -> dict[str, Any]:
    """Train a causal LM (stage pt or sft) and write every output; returns all_results."""
    fingerprint, resume, tokenizer, data = prepare_run(config)
    model = build_model(config, tokenizer)
    trainer = build_trainer(config, tokenizer, data, model, fingerprint)
    return train_and_report(config, trainer, model, data, resume)
