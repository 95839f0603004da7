"""The steps every stage shares: plan the output folder, tokenizer, data, model, train, save, report.

A stage's recipe (train/causal_lm.py, train/preference.py, train/rl.py) builds its own trainer and
otherwise reads `setup -> train_and_report`; `run_stage` picks it from the stage registry.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch
import transformers

from lmforge.config import TrainConfig
from lmforge.data.catalogue import resolve_datasets
from lmforge.data.pipeline import get_datasets, tokenized_files
from lmforge.data.templates import CatalogueTemplate, missing_markers, template_for, template_mismatch
from lmforge.errors import LmforgeError
from lmforge.model.adapters import record_base_model, setup_finetuning
from lmforge.model.lean_ops import apply_lean_swiglu
from lmforge.model.loader import check_weights, count_parameters, load_model, load_tokenizer, resolve_model_path
from lmforge.train.callbacks import JsonlLogCallback, ProgressCallback, StopOnSignal, TrainingStopped
from lmforge.train.checkpoints import STAGING, move_previous_run, resolve_resume, run_fingerprint
from lmforge.train.outputs import build_results, plot_losses, write_model_card, write_results

logger = logging.getLogger(__name__)


def run_stage(config: TrainConfig) -> dict[str, Any]:
    """Train the configured stage with its registered recipe; returns all_results."""
    return config.finetuning.spec.load("recipe")(config)


def data_files(config: TrainConfig) -> list[Path]:
    """The files the run's data comes from: tokenized_path's when it is loaded, else every dataset's."""
    d = config.data
    files = tokenized_files(Path(d.tokenized_path)) if d.tokenized_path else None
    if files is not None:
        return files
    specs = resolve_datasets(d.dataset, d.dataset_dir) + resolve_datasets(d.eval_dataset, d.dataset_dir)
    return [f for spec in specs for f in spec.files]


def fingerprint_run(config: TrainConfig) -> dict[str, Any]:
    """The run's fingerprint: options, data contents, DeepSpeed config, lmforge version, process count."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return run_fingerprint(config.explicit, data_files(config), config.training.deepspeed, world_size)


def plan_output_dir(config: TrainConfig, fingerprint: dict[str, Any]) -> str | None:
    """The checkpoint to resume from, after refusing an output_dir that would be overwritten."""
    if "output_dir" not in config.explicit:
        raise LmforgeError("output_dir is required: set output_dir: saves/my-run")
    t = config.training
    out = Path(t.output_dir)
    if out.exists() and not out.is_dir():
        raise LmforgeError(f"output_dir {out} is a file: choose a folder")
    resume = resolve_resume(t.output_dir, t.resume_from_checkpoint, fingerprint, t.overwrite_output_dir,
                            t.resume_on_changed_data)
    busy = out.is_dir() and any(p.name != STAGING for p in out.iterdir())
    if busy and resume is None and not t.overwrite_output_dir:
        raise LmforgeError(
            f"output_dir {out} is not empty: choose another output_dir, set overwrite_output_dir: true, "
            f"or resume with resume_from_checkpoint"
        )
    if resume:
        logger.info("resuming from %s", resume)
    elif t.overwrite_output_dir:
        move_previous_run(out)
    return resume


def prepare_tokenizer(config: TrainConfig) -> Any:
    """The tokenizer; with a catalogue template it carries that template as its chat_template."""
    tokenizer = load_tokenizer(config.model)
    if config.finetuning.spec.template:
        template = template_for(config.data, tokenizer)
        add_template_markers(template, tokenizer, getattr(config.model, "resize_vocab", False))
        mismatch = template_mismatch(template, tokenizer, tokenizer.chat_template)
        if mismatch:
            logger.warning("template %s differs from the tokenizer's own chat template %s; the saved model will "
                           "use %s (set template: auto to keep the model's format)", template.name, mismatch,
                           template.name)
        if isinstance(template, CatalogueTemplate):
            tokenizer.chat_template = template.to_jinja()
    return tokenizer


def add_template_markers(template: Any, tokenizer: Any, resize_vocab: bool) -> None:
    """A template whose markers (<|im_start|>, a stop word) the tokenizer would split into pieces trains the
    model on those pieces and never lets it stop cleanly: with resize_vocab they become special tokens (the
    embeddings grow when the model loads, new rows at the mean embedding), else the run stops here."""
    missing = missing_markers(template, tokenizer)
    if not missing:
        return
    if not resize_vocab:
        raise LmforgeError(
            f"template {template.name}: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not single tokens "
            "of this tokenizer: set resize_vocab: true to add them as special tokens (the embeddings grow), or "
            "use the model's own format (template: auto)")
    tokenizer.add_tokens(missing, special_tokens=True)
    logger.info("resize_vocab: added %s as special tokens (%d in the vocabulary now)", ", ".join(missing),
                len(tokenizer))


def form_process_group(args: Any) -> None:
    """Start the process group before the model loads: DeepSpeed ZeRO-3 partitions it while loading."""
    _ = args.device  # transformers forms the group (gloo on CPU) on first use
    if args.deepspeed and torch.distributed.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())  # adopts the existing group


def build_model(config: TrainConfig, tokenizer: Any) -> Any:
    """The model with its trainable parameters chosen (a score head where the stage trains a reward model)."""
    transformers.set_seed(config.training.seed)  # the same random init for train_from_scratch
    t = config.training
    compute_dtype = torch.bfloat16 if t.bf16 else torch.float16 if t.fp16 else torch.float32
    model = load_model(config.model, tokenizer, compute_dtype, reward_head=config.finetuning.spec.reward_head)
    if t.lean_mlp and not t.use_liger_kernel:
        apply_lean_swiglu(model)
    transformers.set_seed(config.training.seed)  # the same adapter init however the model was loaded (ZeRO-3 too)
    model = setup_finetuning(model, config.finetuning, config.model, config.training.gradient_checkpointing)
    total, trainable = count_parameters(model)
    logger.info("parameters: %s total, %s trainable (%.4f%%)", f"{total:,}", f"{trainable:,}",
                100 * trainable / max(total, 1))
    return model


def prepare_run(config: TrainConfig) -> tuple[dict[str, Any], str | None, Any, Any]:
    """(fingerprint, checkpoint to resume, tokenizer, data): the steps every stage shares before the model."""
    fingerprint = fingerprint_run(config)
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


def trainer_callbacks(config: TrainConfig) -> list[Any]:
    """The callbacks every stage's trainer gets: trainer_log.jsonl and the progress bar."""
    return [JsonlLogCallback(config.training.output_dir), ProgressCallback()]


def finish_trainer(trainer: Any) -> Any:
    """Drop transformers' own progress bar (lmforge's shows loss and tokens/s)."""
    trainer.remove_callback(transformers.trainer_callback.ProgressCallback)
    return trainer


def trl_config(cls: type, args: transformers.TrainingArguments, **extra: Any) -> Any:
    """A TRL config carrying every transformers.TrainingArguments value of lmforge's args."""
    base = {f.name: getattr(args, f.name) for f in dataclasses.fields(transformers.TrainingArguments) if f.init}
    base["remove_unused_columns"] = False  # the data is already tokenized by lmforge
    return cls(**(base | extra))


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
        perplexity=config.finetuning.spec.perplexity)
    if args.predict_with_generate and data.eval is not None and trainer.is_world_process_zero():
        results.update(predict_with_generate(config, trainer, data.eval))
    if trainer.is_world_process_zero():
        write_reports(config, results)
    return results


def predict_with_generate(config: TrainConfig, trainer: Any, rows: Any) -> dict[str, Any]:
    """sft's predict_with_generate: a reply to every eval row, scored as `lmforge eval`'s generation task does
    (the eval split's last reply is the reference), written to generated_predictions.jsonl."""
    from lmforge.data.templates import stop_token_ids, template_for
    from lmforge.eval.generation import Generator, evaluate_generation, generation_rows

    tokenizer = trainer.processing_class
    template = template_for(config.data, tokenizer)
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    generator = Generator(model, tokenizer, stop_token_ids(tokenizer, template), tuple(template.stop_words),
                          config.rl.max_new_tokens)
    scores = evaluate_generation(generator, generation_rows(rows, tokenizer), config.training.per_device_eval_batch_size,
                                 Path(config.training.output_dir))
    return {f"predict_{k}": v for k, v in scores.items()}


def hyperparameters(config: TrainConfig) -> dict[str, Any]:
    """The options a model card lists."""
    t, f = config.training, config.finetuning
    chosen = {"cutoff_len": config.data.cutoff_len, "template": config.data.template,
              "learning_rate": t.learning_rate,
              "lr_scheduler_type": str(getattr(t.lr_scheduler_type, "value", t.lr_scheduler_type)),
              "per_device_train_batch_size": t.per_device_train_batch_size,
              "gradient_accumulation_steps": t.gradient_accumulation_steps,
              "num_train_epochs": t.num_train_epochs, "max_steps": t.max_steps, "seed": t.seed,
              "bf16": t.bf16, "fp16": t.fp16}
    if f.finetuning_type == "lora":
        chosen |= {"lora_rank": f.lora_rank, "lora_alpha": f.effective_lora_alpha, "lora_target": f.lora_target,
                   "use_dora": f.use_dora, "use_rslora": f.use_rslora}
    return chosen


def write_reports(config: TrainConfig, results: dict[str, Any]) -> None:
    """all_results.json, the stage's plots and the model card."""
    out = config.training.output_dir
    write_results(out, results)
    if config.finetuning.plot_loss:
        plot_losses(out, config.finetuning.spec.plots)
    write_model_card(
        out, base_model=str(config.model.model_name_or_path), stage=config.finetuning.stage,
        method=config.finetuning.finetuning_type, datasets=", ".join(config.data.dataset or []),
        hyperparameters=hyperparameters(config), results=results,
        is_adapter=config.finetuning.finetuning_type == "lora",
    )
    logger.info("done: outputs in %s (train_loss %.4f%s)", out, results.get("train_loss", float("nan")),
                (f", eval_loss {results['eval_loss']:.4f}" if "eval_loss" in results else "")
                + (f", perplexity {results['perplexity']:.2f}" if "perplexity" in results else ""))
