"""The pt and sft recipe: tokenizer -> data -> model -> trainer -> train -> save -> report.

pt and sft differ only in how the data is tokenized (blocks vs. masked conversations); the rest is
one next-token-loss recipe.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import transformers

from lmforge.config import TrainConfig
from lmforge.data.collator import PackedCollator, PaddingCollator
from lmforge.data.pipeline import get_datasets, with_length_column
from lmforge.data.templates import CatalogueTemplate, get_template, template_mismatch
from lmforge.errors import LmforgeError
from lmforge.model.adapters import record_base_model, setup_finetuning
from lmforge.model.lean_ops import apply_lean_swiglu
from lmforge.model.varlen import use_varlen_sdpa
from lmforge.model.loader import check_weights, count_parameters, load_model, load_tokenizer, resolve_model_path
from lmforge.train.callbacks import JsonlLogCallback, ProgressCallback, StopOnSignal, TrainingStopped
from lmforge.train.checkpoints import STAGING, config_fingerprint, resolve_resume
from lmforge.train.outputs import build_results, plot_losses, write_model_card, write_results
from lmforge.train.trainer import LmforgeTrainer

logger = logging.getLogger(__name__)


def plan_output_dir(config: TrainConfig, fingerprint: str) -> str | None:
    """The checkpoint to resume from, after refusing an output_dir that would be overwritten."""
    if "output_dir" not in config.explicit:
        raise LmforgeError("output_dir is required: set output_dir: saves/my-run")
    t = config.training
    out = Path(t.output_dir)
    if out.exists() and not out.is_dir():
        raise LmforgeError(f"output_dir {out} is a file: choose a folder")
    resume = resolve_resume(t.output_dir, t.resume_from_checkpoint, fingerprint, t.overwrite_output_dir)
    busy = out.is_dir() and any(p.name != STAGING for p in out.iterdir())
    if busy and resume is None and not t.overwrite_output_dir:
        raise LmforgeError(
            f"output_dir {out} is not empty: choose another output_dir, set overwrite_output_dir: true, "
            f"or resume with resume_from_checkpoint"
        )
    if resume:
        logger.info("resuming from %s", resume)
    return resume


def prepare_tokenizer(config: TrainConfig) -> Any:
    """The tokenizer; with a catalogue template it carries that template as its chat_template."""
    tokenizer = load_tokenizer(config.model)
    if config.finetuning.stage != "pt":
        template = get_template(config.data.template, tokenizer)
        mismatch = template_mismatch(template, tokenizer, tokenizer.chat_template)
        if mismatch:
            logger.warning("template %s differs from the tokenizer's own chat template %s; the saved model will "
                           "use %s (set template: auto to keep the model's format)", template.name, mismatch,
                           template.name)
        if isinstance(template, CatalogueTemplate):
            tokenizer.chat_template = template.to_jinja()
    return tokenizer


def form_process_group(args: Any) -> None:
    """Start the process group before the model loads: DeepSpeed ZeRO-3 partitions it while loading."""
    _ = args.device  # transformers forms the group (gloo on CPU) on first use
    if args.deepspeed and torch.distributed.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())  # adopts the existing group


def build_model(config: TrainConfig, tokenizer: Any, reward_head: bool = False) -> Any:
    """The model with its trainable parameters chosen; `reward_head` for a reward model."""
    transformers.set_seed(config.training.seed)  # the same random init for train_from_scratch
    t = config.training
    compute_dtype = torch.bfloat16 if t.bf16 else torch.float16 if t.fp16 else torch.float32
    model = load_model(config.model, tokenizer, compute_dtype, reward_head=reward_head)
    if t.lean_mlp and not t.use_liger_kernel:
        apply_lean_swiglu(model)
    transformers.set_seed(config.training.seed)  # the same adapter init however the model was loaded (ZeRO-3 too)
    model = setup_finetuning(model, config.finetuning, config.model, config.training.gradient_checkpointing)
    total, trainable = count_parameters(model)
    logger.info("parameters: %s total, %s trainable (%.4f%%)", f"{total:,}", f"{trainable:,}",
                   100 * trainable / max(total, 1))
    return model


def _hyperparameters(config: TrainConfig) -> dict[str, Any]:
    t, f = config.training, config.finetuning
    chosen = {"cutoff_len": config.data.cutoff_len, "template": config.data.template,
              "learning_rate": t.learning_rate, "lr_scheduler_type": str(getattr(t.lr_scheduler_type, "value", t.lr_scheduler_type)),
              "per_device_train_batch_size": t.per_device_train_batch_size,
              "gradient_accumulation_steps": t.gradient_accumulation_steps,
              "num_train_epochs": t.num_train_epochs, "max_steps": t.max_steps, "seed": t.seed,
              "bf16": t.bf16, "fp16": t.fp16}
    if f.finetuning_type == "lora":
        chosen |= {"lora_rank": f.lora_rank, "lora_alpha": f.effective_lora_alpha, "lora_target": f.lora_target,
                   "use_dora": f.use_dora, "use_rslora": f.use_rslora}
    return chosen


def build_trainer(config: TrainConfig, tokenizer: Any, data: Any, model: Any, fingerprint: str) -> LmforgeTrainer:
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
    if args.train_sampling_strategy == "group_by_length" and not config.data.streaming:
        data.train = with_length_column(data.train)
    trainer = LmforgeTrainer(
        model=model, args=args, train_dataset=data.train, eval_dataset=data.eval, processing_class=tokenizer,
        data_collator=collator, callbacks=[JsonlLogCallback(args.output_dir), ProgressCallback()],
        pack_size=config.data.cutoff_len if packed else None, fingerprint=fingerprint, nan_policy=args.nan_policy,
    )
    trainer.remove_callback(transformers.trainer_callback.ProgressCallback)
    return trainer


def prepare_run(config: TrainConfig) -> tuple[str, str | None, Any, Any]:
    """(fingerprint, checkpoint to resume, tokenizer, data): the steps every stage shares before the model."""
    fingerprint = config_fingerprint(config.explicit)
    resume = plan_output_dir(config, fingerprint)
    if not config.model.train_from_scratch:  # fail fast, before the data is tokenized
        check_weights(Path(resolve_model_path(config.model.model_name_or_path)), config.model.allow_pickle_weights)
    args = config.training
    form_process_group(args)
    tokenizer = prepare_tokenizer(config)
    with args.main_process_first(desc="tokenizing"):  # rank 0 tokenizes; the others then read its cache
        data = get_datasets(config.data, config.finetuning.stage, args.seed, tokenizer)
    logger.info("data: %s", data.summary.describe())
    if config.data.streaming and args.max_steps <= 0:
        raise LmforgeError("streaming needs max_steps: the number of rows is unknown in advance")
    return fingerprint, resume, tokenizer, data


def train_and_report(config: TrainConfig, trainer: Any, model: Any, data: Any, resume: str | None) -> dict[str, Any]:
    """Train (stoppable by signal), save the model and state, evaluate, write every report."""
    args = config.training
    stop = StopOnSignal()
    trainer.add_callback(stop)
    with stop.installed():
        train_result = trainer.train(resume_from_checkpoint=resume)
    if stop.signal is not None:
        raise TrainingStopped(stop.signal, trainer.state.global_step, args.output_dir)
    trainer.save_model(args.output_dir)
    trainer.save_state()
    if config.finetuning.finetuning_type == "lora" and trainer.is_world_process_zero():
        record_base_model(args.output_dir, str(config.model.model_name_or_path))
    eval_metrics = trainer.evaluate() if data.eval is not None else None
    total, trainable = count_parameters(model)
    results = build_results(train_result.metrics, eval_metrics, {
        "train_examples": data.summary.examples, "train_tokens": data.summary.tokens,
        "parameters_total": total, "parameters_trainable": trainable},
        perplexity=config.finetuning.stage in ("pt", "sft"))
    if trainer.is_world_process_zero():
        _write_reports(config, results)
    return results


def run_causal_lm(config: TrainConfig) -> dict[str, Any]:
    """Train a causal LM (stage pt or sft) and write every output; returns all_results."""
    fingerprint, resume, tokenizer, data = prepare_run(config)
    model = build_model(config, tokenizer)
    trainer = build_trainer(config, tokenizer, data, model, fingerprint)
    return train_and_report(config, trainer, model, data, resume)


def _write_reports(config: TrainConfig, results: dict[str, Any]) -> None:
    out = config.training.output_dir
    write_results(out, results)
    if config.finetuning.plot_loss:
        plot_losses(out)
    write_model_card(
        out, base_model=str(config.model.model_name_or_path), stage=config.finetuning.stage,
        method=config.finetuning.finetuning_type, datasets=str(config.data.dataset),
        hyperparameters=_hyperparameters(config), results=results,
        is_adapter=config.finetuning.finetuning_type == "lora",
    )
    logger.info("done: outputs in %s (train_loss %.4f%s)", out, results.get("train_loss", float("nan")),
                (f", eval_loss {results['eval_loss']:.4f}" if "eval_loss" in results else "")
                + (f", perplexity {results['perplexity']:.2f}" if "perplexity" in results else ""))
