"""The option dataclasses. Each field's `help` is the only documentation of that option: `--help`
and the README's option tables come from here. Names follow LLaMA-Factory where the concept is the
same, so its users' YAML files run unchanged."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import transformers

from lmforge.errors import LmforgeError
from lmforge.stages import STAGE_NAMES, Stage, get_stage, stage_help

FINETUNING_TYPES = ("lora", "freeze", "full")
MIX_STRATEGIES = ("concat", "interleave_under", "interleave_over")


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def as_list(value: Any, name: str, item: type = str) -> list[Any] | None:
    """A list option's value as a list of `item`: YAML lists and comma-separated strings alike; None stays None."""
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    try:
        items = [item(p.strip() if isinstance(p, str) else p) for p in parts if not (isinstance(p, str) and not p.strip())]
    except (TypeError, ValueError):
        kind = "numbers" if item is float else "names"
        raise LmforgeError(f"{name} must be {kind} (a YAML list or comma-separated), got {value!r}") from None
    if item is float and not all(map(math.isfinite, items)):
        raise LmforgeError(f"{name} must be finite numbers (a YAML list or comma-separated), got {value!r}")
    return items


def _opt(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with its one-line help."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class ModelArguments:
    """Which model to start from and how to load it."""

    model_name_or_path: str | None = _opt(
        None, "Local Hugging Face model directory, a .gguf file, or a model alias (see `lmforge models`)."
    )
    tokenizer_name_or_path: str | None = _opt(
        None, "Tokenizer directory when it differs from model_name_or_path (e.g. a from-scratch config)."
    )
    adapter_name_or_path: list[str] | None = _opt(
        None,
        "LoRA adapter directories to start from (a list, or comma-separated): all but the last are merged into "
        "the base, the last keeps training.",
    )
    train_from_scratch: bool = _opt(
        False, "Random weights from the config at model_name_or_path (plus model_config overrides)."
    )
    model_config: dict = _opt(
        {},
        "Architecture overrides applied to the model config, e.g. {num_hidden_layers: 4, hidden_size: 256}. "
        "With train_from_scratch and a `model_type` key, no config file is needed.",
    )
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = _opt(
        "auto", "Dtype of the loaded weights: auto (the checkpoint's own), float32, bfloat16, float16."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = _opt(
        "sdpa", "Attention kernel: sdpa (default), eager, or flash_attention_2 (needs flash-attn and a GPU)."
    )
    trust_remote_code: bool = _opt(False, "Allow model code shipped in the model directory to run.")
    allow_pickle_weights: bool = _opt(
        False, "Load weights from pickle files (pytorch_model.bin), which can run code when loaded; off by default."
    )
    quantization_bit: int | None = _opt(
        None,
        "Load the base model in 4 or 8 bits through bitsandbytes (QLoRA: finetuning_type lora). The adapters and "
        "the computation stay in higher precision (bf16 with bf16: true, fp16 with fp16: true, else float32).",
    )
    quantization_type: Literal["nf4", "fp4"] = _opt("nf4", "4-bit data type: nf4 (QLoRA's NormalFloat) or fp4.")
    double_quantization: bool = _opt(True, "4-bit: quantize the quantization constants too (~0.4 bit/param saved).")
    resize_vocab: bool = _opt(
        False, "Let the tokenizer gain tokens (a chat template's markers it would split into pieces become special "
        "tokens) and grow the embeddings and output head to match; the new rows are trained."
    )

    def __post_init__(self) -> None:
        self.adapter_name_or_path = as_list(self.adapter_name_or_path, "adapter_name_or_path") or None
        if self.quantization_bit not in (None, 4, 8):
            raise LmforgeError(f"quantization_bit must be 4 or 8, got {self.quantization_bit}")
        if self.quantization_bit and self.train_from_scratch:
            raise LmforgeError("quantization_bit needs pretrained weights: remove it or train_from_scratch")
        if self.model_config is None:
            self.model_config = {}
        if not isinstance(self.model_config, dict):
            raise LmforgeError(
                f"model_config must be a mapping such as {{num_hidden_layers: 4}}, got {self.model_config!r}"
            )


@dataclass
class DataArguments:
    """Which data to train on and how to turn it into token ids."""

    dataset: list[str] | None = _opt(
        None,
        "Dataset names from dataset_dir/dataset_info.json, or paths to json, jsonl, csv, parquet or txt files or "
        "folders (a list, or comma-separated).",
    )
    eval_dataset: list[str] | None = _opt(None, "Datasets for evaluation, in the same form as `dataset`.")
    dataset_dir: str = _opt("data", "Folder holding dataset_info.json and the files it names.")
    template: str = _opt(
        "auto",
        "Chat template for sft: `auto` renders with the tokenizer's own chat_template; otherwise a "
        "catalogue name (see `lmforge templates`).",
    )
    enable_thinking: bool | None = _opt(
        True, "Reasoning templates (qwen3, deepseekr1, ...): true trains the replies' thoughts (an empty "
        "<think></think> is added to a reply without one, and trained); false removes thoughts and puts the empty "
        "block in the untrained prompt, as the model's non-thinking mode renders it.",
    )
    preserve_thinking: bool = _opt(
        False, "Reasoning templates: keep the thoughts of earlier replies too (default: only the last reply keeps "
        "its thought, as the official templates render a conversation; LLaMA-Factory keeps them all).",
    )
    tool_format: str | None = _opt(
        None, "How tools and tool calls are written (default: the template's own), e.g. default, qwen, llama3, "
        "mistral, glm4.",
    )
    default_system: str | None = _opt(None, "System prompt used when a conversation has none (replaces the template's).")
    cutoff_len: int = _opt(
        2048,
        "Maximum tokens per example. pt: block length. sft: applies to the whole rendered conversation; "
        "whole turns are kept from the start and later turns dropped; when even the first turn does not "
        "fit, its response is cut (never a template marker) or, when the prompt alone does not fit, the "
        "example is dropped. Both are counted in the summary.",
    )
    max_samples: int | None = _opt(None, "Use at most this many rows of each dataset (for quick runs).")
    val_size: float = _opt(
        0.0,
        "Held-out evaluation split, taken after tokenization with `seed`: a fraction in (0, 1) or a count "
        ">= 1 of examples (pt: blocks of cutoff_len tokens; sft: conversations).",
    )
    mix_strategy: Literal["concat", "interleave_under", "interleave_over"] = _opt(
        "concat",
        "How several datasets are mixed: concat; interleave_under (stop at the first exhausted); "
        "interleave_over (oversample until all are exhausted).",
    )
    interleave_probs: list[float] | None = _opt(
        None, "Sampling probabilities for interleave_* strategies, one per dataset (a list, or comma-separated)."
    )
    streaming: bool = _opt(False, "Stream the data instead of loading it all (stage pt and sft; needs max_steps; no "
                           "cache). Checkpoints save the stream's position (each loader worker's too); a resume "
                           "continues it exactly.")
    preprocessing_num_workers: int | None = _opt(None, "Processes used to tokenize the data.")
    overwrite_cache: bool = _opt(False, "Tokenize again even when a cached result exists.")
    tokenized_path: str | None = _opt(
        None,
        "Where `lmforge preprocess` saves the tokenized data; `train` loads it from there when it exists "
        "(the data options are then ignored). Stage pt saves token shards there (see lmforge/data/shards.py), "
        "cut into cutoff_len blocks, with val_size held out, when train reads them.",
    )
    train_on_prompt: bool = _opt(False, "sft: take loss on every token, prompt and template included.")
    mask_history: bool = _opt(False, "sft: take loss only on the last assistant turn of each conversation.")
    skip_invalid_examples: bool = _opt(
        False,
        "false: stop at the first invalid row, naming its file and line; true: skip invalid rows and count "
        "them in the data summary (see `lmforge data check`).",
    )
    packing: bool = _opt(
        False,
        "Pack examples into rows of cutoff_len tokens (best-fit-decreasing) with no attention across "
        "examples on any backend and a loss equal to unpacked. sft: whole conversations; pt: whole "
        "documents (split at cutoff_len) instead of concatenating across document boundaries. "
        "LLaMA-Factory's neat_packing is accepted as the same option.",
    )
    identity_name: str = _opt("Forge", "Fills {{name}} in the built-in `identity` dataset: the model's new name.")
    identity_author: str = _opt("lmforge", "Fills {{author}} in the built-in `identity` dataset: who made the model.")

    def __post_init__(self) -> None:
        self.dataset = as_list(self.dataset, "dataset") or None
        self.eval_dataset = as_list(self.eval_dataset, "eval_dataset") or None
        self.interleave_probs = as_list(self.interleave_probs, "interleave_probs", float) or None
        if self.cutoff_len < 2:
            raise LmforgeError(f"cutoff_len must be at least 2, got {self.cutoff_len}")
        whole = self.val_size >= 1 and float(self.val_size).is_integer()
        if self.val_size != 0 and not 0 < self.val_size < 1 and not whole:
            raise LmforgeError(f"val_size must be 0, a fraction in (0, 1) or a whole number >= 1 of examples, "
                               f"got {self.val_size}")
        if self.train_on_prompt and self.mask_history:
            raise LmforgeError("train_on_prompt and mask_history contradict each other: set only one")
        if self.streaming and self.packing:
            raise LmforgeError("packing needs the whole dataset to place examples; set streaming: false or packing: false")
        if self.max_samples is not None and self.max_samples < 1:
            raise LmforgeError(f"max_samples must be >= 1, got {self.max_samples}")
        weights = self.interleave_probs
        if weights is not None and (min(weights) < 0 or not sum(weights) > 0):
            raise LmforgeError(f"interleave_probs must be numbers >= 0, one per dataset and summing to more than 0 "
                               f"(e.g. [0.7, 0.3]), got {weights}")


def reject_foreign_options(group: Any, key: str, owners: tuple[str, ...], names: tuple[str, ...],
                           value: Any = None) -> None:
    """LoRA options with finetuning_type full, DPO options with stage sft (and the like) are almost always a
    mistake: refuse options of `group` changed from their defaults while `key` (of group, or `value`) is
    not one of `owners`."""
    current = getattr(group, key) if value is None else value
    if current in owners:
        return
    defaults = {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(group)}
    changed = [n for n in names if getattr(group, n) != defaults[n]]
    if changed:
        verb = "applies" if len(changed) == 1 else "apply"
        wanted = " or ".join(owners)
        raise LmforgeError(f"{', '.join(changed)} {verb} only to {key}: {wanted}, but {key} is {current}: "
                           f"set {key}: {owners[0]} or remove {changed[0]}")


@dataclass
class FinetuningArguments:
    """What is trained: the stage and which parameters learn."""

    stage: Literal[STAGE_NAMES] = _opt("sft", f"Training stage. {stage_help()}.")
    finetuning_type: Literal["lora", "freeze", "full"] = _opt(
        "lora", "Which weights learn: lora (adapters via peft), freeze (the last layers), full."
    )
    lora_rank: int = _opt(8, "LoRA rank r.")
    lora_alpha: int | None = _opt(None, "LoRA alpha (scaling = alpha / r); default 2 x lora_rank.")
    lora_dropout: float = _opt(0.0, "Dropout on the LoRA branch.")
    lora_target: list[str] = _opt(
        ["all"], "Module names to adapt (a list, or comma-separated); `all` = every linear layer but the output head."
    )
    additional_target: list[str] | None = _opt(
        None, "Modules trained in full beside LoRA and saved with it (a list, or comma-separated: embed_tokens,lm_head)."
    )
    use_dora: bool = _opt(False, "Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = _opt(False, "Rank-stabilised LoRA: scaling = alpha / sqrt(r).")
    freeze_trainable_layers: int = _opt(
        2, "freeze: how many transformer blocks train; positive = the last n, negative = the first n."
    )
    freeze_trainable_modules: list[str] = _opt(
        ["all"], "freeze: module names inside the trainable blocks (a list, or comma-separated: mlp,self_attn), or all."
    )
    freeze_extra_modules: list[str] | None = _opt(
        None, "freeze: modules outside the blocks that also train (a list, or comma-separated: embed_tokens,norm)."
    )
    plot_loss: bool = _opt(True, "Save training_loss.png (and eval_loss.png) in output_dir.")
    pref_beta: float = _opt(
        0.1, "dpo, kto: strength of the preference term (DPO's and KTO's beta; for orpo the weight of the "
        "odds-ratio term)."
    )
    pref_loss: Literal["sigmoid", "ipo", "hinge", "orpo", "simpo"] = _opt(
        "sigmoid",
        "dpo: sigmoid (DPO), ipo, hinge (both against the reference model), orpo or simpo (reference-free, "
        "on length-averaged log-probabilities).",
    )
    pref_ftx: float = _opt(0.0, "dpo: weight of an added SFT loss on the chosen responses (0 = none).")
    kto_chosen_weight: float = _opt(1.0, "kto: weight of the loss on desirable (label true) examples.")
    kto_rejected_weight: float = _opt(1.0, "kto: weight of the loss on undesirable (label false) examples.")
    simpo_gamma: float = _opt(0.5, "simpo: target reward margin gamma.")
    precompute_ref_log_probs: bool = _opt(
        False, "dpo, kto with full/freeze tuning: compute the reference log-probs once before training, so no "
        "reference copy stays in memory (LoRA needs no copy: the reference is the adapter disabled).",
    )

    def __post_init__(self) -> None:
        for name in ("lora_target", "additional_target", "freeze_trainable_modules", "freeze_extra_modules"):
            setattr(self, name, as_list(getattr(self, name), name))
        if not self.lora_target or not self.freeze_trainable_modules:
            raise LmforgeError("lora_target and freeze_trainable_modules need at least one module name (or all)")
        self.additional_target = self.additional_target or None
        self.freeze_extra_modules = self.freeze_extra_modules or None
        if self.pref_beta <= 0:
            raise LmforgeError(f"pref_beta must be > 0, got {self.pref_beta}")
        if self.pref_ftx < 0:
            raise LmforgeError(f"pref_ftx must be >= 0, got {self.pref_ftx}")
        if min(self.kto_chosen_weight, self.kto_rejected_weight) <= 0:
            raise LmforgeError("kto_chosen_weight and kto_rejected_weight must be > 0")
        self._reject_foreign_options("finetuning_type", "lora", ("lora_rank", "lora_alpha", "lora_dropout",
                                                                 "lora_target", "additional_target", "use_dora",
                                                                 "use_rslora"))
        self._reject_foreign_options("finetuning_type", "freeze", ("freeze_trainable_layers",
                                                                   "freeze_trainable_modules", "freeze_extra_modules"))
        if self.lora_rank < 1:
            raise LmforgeError(f"lora_rank must be >= 1, got {self.lora_rank}")
        if self.freeze_trainable_layers == 0:
            raise LmforgeError("freeze_trainable_layers must not be 0: positive = last n blocks, negative = first n")

    def _reject_foreign_options(self, key: str, owner: str, names: tuple[str, ...]) -> None:
        reject_foreign_options(self, key, (owner,), names)

    @property
    def spec(self) -> Stage:
        """The registry entry of `stage` (ppo: grpo's)."""
        return get_stage(self.stage)

    @property
    def effective_lora_alpha(self) -> int:
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_rank


BUILTIN_REWARDS = ("exact_match", "format", "length")


@dataclass
class RLArguments:
    """grpo (and ppo): where rewards come from and how completions are sampled."""

    reward_model: str | None = _opt(
        None, "A reward model trained with stage rm (its output_dir: full model or LoRA adapter); it scores "
        "each sampled completion, rendered with the same template as in training."
    )
    reward_funcs: list[str] | None = _opt(
        None, "Reward functions (a list, or comma-separated): exact_match (1 when the completion, or its <answer>...</answer> "
        "part, equals the row's `answer` column, case and spacing ignored), format (1 when the completion "
        "matches reward_format_regex), length (0 up to 3/4 of max_new_tokens, then falling to -1 at the "
        "limit: DAPO's soft overlong penalty), or module:function for your own (called with prompts, "
        "completions, completion_ids and every data column as keyword lists; returns one float per "
        "completion).",
    )
    reward_weights: list[float] | None = _opt(
        None, "Weights, one per reward source (reward_model first, then reward_funcs; a list, or comma-separated); "
        "default 1 each."
    )
    reward_format_regex: str = _opt(
        r"<think>.*?</think>\s*<answer>.*?</answer>",
        "The `format` reward's pattern, matched against the whole completion (dot matches newlines).",
    )
    num_generations: int = _opt(
        8, "Completions sampled per prompt (the group whose rewards are compared); the global batch "
        "(processes x per_device_train_batch_size x gradient_accumulation_steps) must be divisible by it."
    )
    max_new_tokens: int = _opt(
        128, "Longest generated text, in tokens: grpo's sampled completions; sft's replies with predict_with_generate."
    )
    temperature: float = _opt(1.0, "Sampling temperature of the completions (> 0).")
    top_p: float = _opt(1.0, "Nucleus sampling of the completions: keep tokens up to this probability mass.")
    top_k: int = _opt(0, "Sample only among the k most likely tokens (0 = no limit).")
    kl_beta: float = _opt(
        0.0, "Weight of the KL penalty to the starting policy (0 = none, and no reference model is kept)."
    )
    rl_loss: Literal["dapo", "grpo", "dr_grpo", "bnpo"] = _opt(
        "dapo", "How token losses are averaged: dapo (over all completion tokens of the batch, TRL's default), "
        "grpo (per completion, then over completions), dr_grpo (by a constant), bnpo (per local batch)."
    )

    def __post_init__(self) -> None:
        self.reward_funcs = as_list(self.reward_funcs, "reward_funcs") or None
        self.reward_weights = as_list(self.reward_weights, "reward_weights", float) or None
        if self.num_generations < 2:
            raise LmforgeError(f"num_generations must be >= 2 (rewards are compared within a group), "
                               f"got {self.num_generations}")
        if self.max_new_tokens < 1:
            raise LmforgeError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise LmforgeError(f"temperature must be > 0 for sampling completions, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise LmforgeError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.kl_beta < 0:
            raise LmforgeError(f"kl_beta must be >= 0, got {self.kl_beta}")
        weights = self.reward_weights
        if weights is not None and len(weights) != len(self.sources):
            raise LmforgeError(f"reward_weights has {len(weights)} values but there are {len(self.sources)} reward "
                               f"sources ({', '.join(self.sources) or 'none'}): give one weight per source")

    @property
    def functions(self) -> list[str]:
        return list(self.reward_funcs or [])

    @property
    def sources(self) -> list[str]:
        return ([self.reward_model] if self.reward_model else []) + self.functions


@dataclass
class LaunchArguments:
    """How `lmforge train` starts several processes (it re-launches itself through torchrun).

    The environment variables FORCE_TORCHRUN=1, NPROC_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR and
    MASTER_PORT (LLaMA-Factory's names) work too; options given here take precedence."""

    nproc_per_node: int | None = _opt(
        None, "Processes on this machine (one per GPU; on CPU, gloo processes). More than 1 launches torchrun."
    )
    nnodes: int | None = _opt(None, "Machines taking part; more than 1 launches torchrun on each of them.")
    node_rank: int | None = _opt(None, "This machine's index among the nnodes (0 is the master).")
    master_addr: str | None = _opt(None, "Address of node 0, reachable from every node (default 127.0.0.1).")
    master_port: int | None = _opt(None, "Free TCP port on node 0 for the rendezvous (default 29500).")
    host_allocator: Literal["auto", "jemalloc", "tcmalloc", "system"] = _opt(
        "auto",
        "The C allocator of a CPU training process. auto: tcmalloc when installed (about 40% less peak memory "
        "than glibc's malloc at about the same speed: no heap fragmentation as batch shapes change), on CPU runs "
        "without release_host_memory; `lmforge train` re-executes itself once with it in LD_PRELOAD. "
        "tcmalloc / jemalloc: that one, on any device (an error when it is not installed; jemalloc saved as much "
        "memory but was a quarter slower). system: the C library's own malloc.",
    )


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    """transformers.TrainingArguments with lmforge's defaults and LLaMA-Factory's extra names."""

    output_dir: str | None = _opt(None, "Where the model, checkpoints, logs and plots are written.")
    overwrite_output_dir: bool = _opt(
        False, "Allow training into a non-empty output_dir (its old checkpoints are not resumed)."
    )
    resume_from_checkpoint: str | None = _opt(
        None,
        "A checkpoint folder, or auto: the newest whole checkpoint in output_dir (damaged ones are skipped "
        "with a warning). Unset, a run whose output_dir holds checkpoints of the same config resumes itself.",
    )
    resume_on_changed_data: bool = _opt(
        False,
        "Resume even when the data files' contents, the deepspeed config, the lmforge version or the number of "
        "processes differ from the checkpoint's run (each is named in a warning); otherwise such a resume is "
        "refused, naming what changed.",
    )
    warmup_ratio: float = _opt(0.0, "Fraction of the total steps used for linear warm-up (sets warmup_steps).")
    logging_steps: float = _opt(10, "Log every n optimizer steps (or a fraction of the total when < 1).")
    save_steps: float = _opt(500, "Save a checkpoint every n optimizer steps (or a fraction of the total when < 1).")
    nan_policy: Literal["stop", "skip"] = _opt(
        "stop",
        "A non-finite loss or gradient: stop (default; says at which step and micro-batch, saves nothing new "
        "and keeps the last good checkpoint) or skip (that optimizer step's update is skipped on every process "
        "and counted as skipped_steps in the log). Decided once for all processes. Under fp16, overflowing "
        "gradients are left to the loss scaler (counted as overflow_steps).",
    )
    loss_chunking: Literal["auto", "on", "off"] = _opt(
        "auto",
        "Compute the loss from the output head's input in chunks, only at loss positions, never "
        "materialising [batch, seq, vocab] logits (training only). auto: on when the vocabulary has "
        ">= 32k tokens and the head is a plain linear layer; off with use_liger_kernel (Liger fuses it) and with "
        "label_smoothing_factor (transformers' label smoother reads the logits).",
    )
    lean_mlp: bool = _opt(
        True,
        "Llama, Mistral and Qwen SwiGLU MLPs keep gate and up for the backward and recompute silu(gate), "
        "instead of keeping all three: identical numbers, about a sixth less activation memory. "
        "Off with use_liger_kernel (Liger replaces the MLP).",
    )
    release_host_memory: bool = _opt(
        False,
        "Training on CPU (glibc): give every freed tensor of 1 MB or more back to the OS at once. Peak "
        "memory falls by about 40% (no heap fragmentation), but each step is about 1.6x slower, as its "
        "activations are page-faulted in afresh.",
    )
    predict_with_generate: bool = _opt(
        False,
        "sft: after training, reply to every eval row (greedy, at most max_new_tokens, the template's stop tokens) "
        "and score the replies against the rows' own replies (exact match, BLEU-4, ROUGE-1/2/L) as `lmforge eval` "
        "does; writes generated_predictions.jsonl and predict_* results. Needs eval rows (val_size or eval_dataset).",
    )
    train_sampling_strategy: str = _opt(
        "group_by_length",
        "Training sampler: group_by_length (default; batches of similar length, little padding), random, "
        "sequential or batch_rebalance.",
    )

    def __post_init__(self) -> None:
        if self.bf16 and self.fp16:
            raise LmforgeError("bf16 and fp16 are both set: choose one mixed-precision mode")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise LmforgeError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_ratio:
            if not 0 < self.warmup_ratio < 1:
                raise LmforgeError(f"warmup_ratio must be in (0, 1), got {self.warmup_ratio}")
            if self.warmup_steps:
                raise LmforgeError("warmup_ratio and warmup_steps are both set: choose one")
            self.warmup_steps = self.warmup_ratio  # transformers reads a float < 1 as a ratio
        if not self.use_cpu and not _has_accelerator():
            # No GPU: transformers forms a multi-process CPU group (and allows bf16 autocast) only with use_cpu
            self.use_cpu = True
        if self.use_cpu and self.ddp_backend is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            self.ddp_backend = "gloo"
        if isinstance(self.deepspeed, str):
            check_deepspeed_config(self.deepspeed, str(getattr(self.optim, "value", self.optim)))
            if self.nan_policy == "skip":
                # DeepSpeed steps its optimizer inside backward, before any check could skip the update
                raise LmforgeError("nan_policy skip cannot work with deepspeed (it updates the weights inside "
                                   "backward): set nan_policy: stop or train without deepspeed")
        if self.label_smoothing_factor:
            if self.loss_chunking == "on":
                raise LmforgeError("label_smoothing_factor needs the logits, which loss_chunking on never forms: set "
                                   "loss_chunking: auto or off")
            self.loss_chunking = "off"  # transformers' label smoother reads the logits
        from lmforge.train.tracking import check_trackers

        check_trackers(self.report_to)
        try:
            super().__post_init__()
        except ValueError as err:
            raise LmforgeError(f"invalid training option: {err}") from err


OFFLOAD_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")


def check_deepspeed_config(path: str, optim: str) -> None:
    """A readable DeepSpeed JSON, DeepSpeed installed, and an optimizer its CPU offload runs correctly."""
    if importlib.util.find_spec("deepspeed") is None:
        raise LmforgeError("deepspeed is set but DeepSpeed is not installed: pip install 'lmforge[deepspeed]'")
    file = Path(path)
    if not file.is_file():
        raise LmforgeError(f"deepspeed: no such file {path} (ready configs are in examples/deepspeed/)")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise LmforgeError(f"deepspeed: {path} line {err.lineno} column {err.colno}: {err.msg}") from err
    zero = config.get("zero_optimization", {})
    offload = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
    if offload and "optimizer" not in config and optim not in OFFLOAD_OPTIMIZERS:
        # DeepSpeed applies other torch optimizers to offloaded partitions wrongly (sgd diverged in our check)
        raise LmforgeError(f"deepspeed: {path} offloads the optimizer, which runs Adam-family optimizers only: "
                           f"set optim: adamw_torch (not {optim}) or remove offload_optimizer")


@dataclass
class DoctorArguments:
    """What `lmforge data check` shows and where it writes its report."""

    show_examples: int = _opt(3, "How many rendered examples to print with their trained tokens marked.")
    report_dir: str | None = _opt(
        None, "Folder for the length histogram and report.json (default: output_dir/data_check or ./data_check)."
    )


@dataclass
class GenerationArguments:
    """How `lmforge chat` and the demo generate text."""

    template: str = _opt(
        "auto", "Chat template used to render the prompt: auto (the tokenizer's own) or a catalogue name."
    )
    system: str | None = _opt(None, "System prompt; when unset the template's default system prompt applies.")
    enable_thinking: bool | None = _opt(
        True, "Reasoning templates: false starts each reply with an empty thought block (the non-thinking mode).")
    tool_format: str | None = _opt(None, "How tools and tool calls are written (default: the template's own).")
    default_system: str | None = _opt(None, "Replaces the template's default system prompt.")
    tools: str | None = _opt(
        None, "A JSON file with the tools the model may call (a list of OpenAI-style function descriptions); "
        "replies that call them are printed as JSON.",
    )
    temperature: float = _opt(
        0.0, "Sampling temperature; 0 (default) is greedy decoding, which small models answer best with."
    )
    top_p: float = _opt(0.9, "Nucleus sampling: keep the smallest set of tokens whose probability sums to top_p.")
    top_k: int = _opt(50, "Sample only among the k most likely tokens (0 = no limit).")
    max_new_tokens: int = _opt(256, "Most tokens generated for one reply.")
    repetition_penalty: float = _opt(1.1, "Penalty > 1 discourages repeating tokens (1.0 = off).")
    seed: int = _opt(42, "Random seed for sampling, so a run can be repeated.")
    query: str | None = _opt(None, "Answer this one message, print only the answer and exit (no REPL).")
    device: Literal["auto", "cpu", "cuda"] = _opt(
        "auto", "Where the model runs: auto (the GPU when there is one, spread over several with device_map auto "
        "when one cannot hold it; else the CPU), cpu, or cuda (an error without a GPU)."
    )
    infer_dtype: Literal["auto", "float32", "bfloat16", "float16"] = _opt(
        "auto", "Dtype of the weights for generation: auto (the checkpoint's own), float32, bfloat16, float16."
    )

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise LmforgeError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise LmforgeError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise LmforgeError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class ScoreArguments:
    """What `lmforge score` reads and writes."""

    reward_model: str | None = _opt(None, "The output_dir of an rm run (full model or LoRA adapter).")
    input: str | None = _opt(
        None, "JSON lines or JSON file of rows: prompt (a string or messages) with response (or completion), "
        "or messages whose last turn is the assistant's."
    )
    output: str | None = _opt(None, "Where the rows are written with a `score` field (default INPUT.scored.jsonl); "
                              "an existing file is never overwritten.")
    template: str = _opt("auto", "Chat template that renders each row, as in the rm run (auto: the tokenizer's own).")
    batch_size: int = _opt(8, "Rows scored per forward pass.")
    device: Literal["auto", "cpu", "cuda"] = _opt(
        "auto", "Where the reward model runs: auto (the GPU when there is one, else the CPU), cpu, or cuda."
    )

    def __post_init__(self) -> None:
        if not self.reward_model or not self.input:
            raise LmforgeError("score needs --reward_model DIR (an rm run's output_dir) and --input FILE")
        if self.batch_size < 1:
            raise LmforgeError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class ExportArguments:
    """Where and how `lmforge export` writes a merged, standalone model."""

    export_dir: str | None = _opt(None, "Folder for the merged model; must not exist or be empty.")
    export_size: float = _opt(5.0, "Largest safetensors shard, in GB.")
    export_dtype: Literal["auto", "float32", "bfloat16", "float16"] = _opt(
        "auto", "Dtype of the saved weights: auto keeps the base model's dtype."
    )
    template: str | None = _opt(
        None, "Catalogue template to save as the tokenizer's chat_template, in the .gguf and the Modelfile too "
        "(default: keep the adapter's or base's)."
    )
    enable_thinking: bool | None = _opt(
        True, "Reasoning templates: how the saved chat template renders (false: the non-thinking mode).")
    default_system: str | None = _opt(None, "Replaces the template's default system prompt in the saved chat template.")
    check_tolerance: float = _opt(
        1e-6,
        "Largest allowed |output difference| of any merged LoRA layer from the same layer with its adapter "
        "(base+adapter), on a seeded random probe input; each layer is merged and compared in float64, where a "
        "correct merge agrees to ~1e-12.",
    )
    export_device: Literal["cpu", "auto"] = _opt(
        "cpu", "The device used in model export, use `auto` to accelerate exporting: the LoRA layers are merged "
        "one at a time on the GPU when one is visible (else on the CPU); the model stays in host memory."
    )
    export_format: Literal["hf", "gguf"] = _opt(
        "hf", "hf: a Hugging Face folder (safetensors); gguf: one .gguf file for llama.cpp, Ollama and LM Studio."
    )
    gguf_type: Literal["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"] | None = _opt(
        None, "Tensor type of the .gguf file (default f16); norms and other 1-D tensors stay f32, and with "
        "q4/q5 types the output projection is q8_0 (k-quants such as q4_K: run llama.cpp's llama-quantize on "
        "the f16 file). Needs export_format: gguf.",
    )
    export_ollama: bool = _opt(
        False, "Also write an Ollama Modelfile beside the .gguf (chat template, stop tokens, default system prompt); "
        "needs export_format: gguf.",
    )

    def __post_init__(self) -> None:
        if self.export_size <= 0:
            raise LmforgeError(f"export_size must be > 0 GB, got {self.export_size}")
        if self.export_format != "gguf":
            for name in ("gguf_type", "export_ollama"):
                if getattr(self, name):
                    raise LmforgeError(f"{name} applies to GGUF files: add --export_format gguf, or drop {name}")
        elif self.export_dtype != "auto":
            raise LmforgeError("export_dtype applies to export_format hf; for gguf choose the type with gguf_type")


EVAL_TASKS = ("perplexity", "generation", "choice", "lm_eval")


@dataclass
class EvalArguments:
    """What `lmforge eval` measures and where it writes the results."""

    eval_task: list[str] = _opt(
        [],
        "What to measure, comma-separated: perplexity (the loss on the tokens training takes loss on), generation "
        "(replies to the rows' prompts scored against their references), choice (a multiple-choice benchmark from "
        "task_dir), lm_eval:TASK,TASK (lm-evaluation-harness tasks; needs lmforge[eval]). Unset with `task` set: "
        "choice, as LLaMA-Factory's eval reads it.",
    )
    output_dir: str | None = _opt(
        None, "Folder for eval_results.json, generated_predictions.jsonl and the charts (LLaMA-Factory's save_dir "
        "is read as this option)."
    )
    overwrite_output_dir: bool = _opt(False, "Replace the eval_results.json of an earlier eval in output_dir.")
    stage: Literal["pt", "sft"] = _opt(
        "sft", "How dataset / eval_dataset rows are tokenized for perplexity and generation, as train's stage: pt "
        "(blocks of text) or sft (conversations, loss on the replies)."
    )
    batch_size: int = _opt(
        8, "Rows per forward pass. perplexity's eval_loss equals train's when this is train's "
        "per_device_eval_batch_size (8 by default)."
    )
    seed: int = _opt(42, "Seed of the val_size split (train's seed gives train's eval rows) and of sampling.")
    batch_order: Literal["group_by_length", "sequential"] = _opt(
        "group_by_length", "perplexity: which rows share a batch, as in train's eval loop: group_by_length (rows of "
        "similar length, shuffled by seed; train's default train_sampling_strategy) or sequential (dataset order; "
        "train's other samplers)."
    )
    max_new_tokens: int = _opt(256, "generation: most tokens generated per reply.")
    temperature: float = _opt(0.0, "generation: sampling temperature; 0 (default) is greedy decoding.")
    top_p: float = _opt(0.9, "generation: nucleus sampling threshold when temperature > 0.")
    repetition_penalty: float = _opt(1.0, "generation: penalty > 1 discourages repeated tokens (1.0 = off).")
    task: str | None = _opt(
        None, "choice: the benchmark folder under task_dir with LLaMA-Factory's split suffix, e.g. mmlu_test, "
        "ceval_validation, cmmlu_test (no suffix: the test split; unset: task_dir is the benchmark folder)."
    )
    task_dir: str = _opt(
        "evaluation", "choice: folder of benchmark folders, each in LLaMA-Factory's evaluation/<task> CSV layout "
        "or cais/mmlu's parquet layout (one folder per subject)."
    )
    subjects: list[str] | None = _opt(None, "choice: comma-separated subjects to evaluate (default: every subject).")
    n_shot: int = _opt(5, "choice: answered questions from each subject's dev split shown before each question (0-5).")
    lang: Literal["en", "zh"] = _opt("en", "choice: prompt language (LLaMA-Factory's en and zh eval templates).")
    lm_eval_include_path: str | None = _opt(None, "lm_eval: a folder of your own lm-eval task YAML files.")
    lm_eval_tasks: list[str] = field(default_factory=list, init=False)  # the TASK names of lm_eval:TASK,TASK

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise LmforgeError("eval needs output_dir: the folder for eval_results.json (e.g. saves/my-run/eval)")
        if not self.eval_task and self.task:  # LLaMA-Factory's eval configs name only the benchmark
            self.eval_task = ["choice"]
        self.eval_task, self.lm_eval_tasks = _split_eval_tasks(list(self.eval_task or []))
        if self.batch_size < 1:
            raise LmforgeError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.n_shot <= 5:
            raise LmforgeError(f"n_shot must be 0 to 5 (answered dev questions per prompt), got {self.n_shot}")
        if self.max_new_tokens < 1:
            raise LmforgeError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise LmforgeError(f"temperature must be >= 0 and top_p in (0, 1], got {self.temperature} and {self.top_p}")


def _split_eval_tasks(items: list[str]) -> tuple[list[str], list[str]]:
    """(kinds in order, lm-eval task names): `lm_eval:a,b` arrives split at the comma, so names after an
    lm_eval item that are not kinds belong to it."""
    import difflib

    if not items:
        raise LmforgeError(f"eval needs eval_task: one or more of {', '.join(EVAL_TASKS)} (as lm_eval:TASK)")
    kinds: list[str] = []
    harness: list[str] = []
    for item in items:
        kind, colon, names = item.partition(":")
        if kind == "lm_eval" and colon:
            harness += [n.strip() for n in names.split(",") if n.strip()]
        elif item not in EVAL_TASKS[:3] and "lm_eval" in kinds:
            harness.append(item)  # `lm_eval:a,b` arrives split at its comma
            continue
        elif item not in EVAL_TASKS[:3]:
            close = difflib.get_close_matches(kind, EVAL_TASKS, n=1)
            hint = f": did you mean '{close[0]}'?" if close else ""
            raise LmforgeError(f"eval_task: unknown task '{item}'{hint} (use {', '.join(EVAL_TASKS[:3])} or "
                               "lm_eval:TASK)")
        if kind not in kinds:
            kinds.append(kind)
    if "lm_eval" in kinds and not harness:
        raise LmforgeError("eval_task lm_eval needs task names: lm_eval:TASK,TASK")
    return kinds, harness


def _env_default(value: Any, env: str, default: Any) -> Any:
    """An option's value; when not given, the environment variable `env`, else `default`."""
    return value if value is not None else os.environ.get(env) or default


def _env_port(value: int | None, env: str, default: int) -> int:
    """A port option's value, else the environment variable `env` (which must be a number), else `default`."""
    port = _env_default(value, env, default)
    try:
        return int(port)
    except ValueError:
        raise LmforgeError(f"{env} must be a port number, got {port!r}") from None


@dataclass
class ApiArguments:
    """Where `lmforge api` listens and what it lets a client do."""

    api_host: str | None = _opt(
        None, "Address to listen on (default 127.0.0.1, or the API_HOST environment variable); any address that "
        "is not loopback exposes the model to the network and is warned about."
    )
    api_port: int | None = _opt(None, "TCP port to listen on (default 8000, or the API_PORT environment variable).")
    api_key: str | None = _opt(
        None, "When set (or the API_KEY environment variable), every /v1 request must send "
        "`Authorization: Bearer API_KEY`; others get 401."
    )
    served_model_name: str | None = _opt(
        None, "The model id clients send and /v1/models lists (default: the model or adapter directory's name)."
    )
    max_concurrency: int = _opt(1, "Generations that run at the same time; later requests wait in the queue.")
    max_queue: int = _opt(8, "Requests that may wait for a generation slot; beyond them a request gets 429.")
    max_new_tokens_limit: int = _opt(2048, "Upper bound on a request's max_tokens (larger values are capped).")
    max_request_bytes: int = _opt(1_000_000, "Largest request body accepted; larger ones get 413.")

    def __post_init__(self) -> None:
        self.api_host = _env_default(self.api_host, "API_HOST", "127.0.0.1")
        self.api_port = _env_port(self.api_port, "API_PORT", 8000)
        self.api_key = _env_default(self.api_key, "API_KEY", None)
        if not 0 <= self.api_port <= 65535:
            raise LmforgeError(f"api_port must be in 0..65535 (0: any free port), got {self.api_port}")
        for name, low in (("max_concurrency", 1), ("max_queue", 0), ("max_new_tokens_limit", 1),
                          ("max_request_bytes", 1024)):
            if getattr(self, name) < low:
                raise LmforgeError(f"{name} must be >= {low}, got {getattr(self, name)}")


@dataclass
class WebuiArguments:
    """Where `lmforge webui` listens."""

    webui_host: str | None = _opt(
        None, "Address to listen on (default 127.0.0.1, or the GRADIO_SERVER_NAME environment variable); any "
        "address that is not loopback lets others on the network start training on this machine, and is warned about."
    )
    webui_port: int | None = _opt(
        None, "TCP port to listen on (default 7860, or the GRADIO_SERVER_PORT environment variable)."
    )
    share: bool = _opt(False, "Also publish the page through a public gradio.live link (off unless asked).")

    def __post_init__(self) -> None:
        self.webui_host = _env_default(self.webui_host, "GRADIO_SERVER_NAME", "127.0.0.1")
        self.webui_port = _env_port(self.webui_port, "GRADIO_SERVER_PORT", 7860)
        if not 0 < self.webui_port <= 65535:
            raise LmforgeError(f"webui_port must be in 1..65535, got {self.webui_port}")
