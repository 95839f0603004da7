"""Where lmforge relies on private upstream code: every such hook listed once, with the signature it was
written against, so an upgrade that moves one fails a test (tests/unit/test_compat.py) instead of
training silently wrong. The tested versions are pinned in pyproject.toml."""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass


@dataclass(frozen=True)
class PrivateHook:
    """An upstream private method lmforge overrides or calls, and where."""

    owner: str  # module:class
    name: str
    parameters: tuple[str, ...]  # without self
    used_by: str

    def resolve(self) -> object:
        """The upstream attribute itself."""
        module, _, cls = self.owner.partition(":")
        return getattr(getattr(importlib.import_module(module), cls), self.name)


PRIVATE_HOOKS = (
    PrivateHook("transformers:Trainer", "_save_checkpoint", ("model", "trial"),
                "EngineMixin._save_checkpoint: stage, manifest and rename checkpoints"),
    PrivateHook("transformers:Trainer", "_save", ("output_dir", "state_dict"),
                "EngineMixin._save: drop tied copies from engine-gathered state dicts"),
    PrivateHook("transformers:Trainer", "_get_output_dir", ("trial",), "EngineMixin._save_checkpoint"),
    PrivateHook("transformers:Trainer", "_init_training_state",
                ("max_steps", "num_update_steps_per_epoch", "num_train_epochs", "resume_from_checkpoint", "trial"),
                "EngineMixin._init_training_state: a stream resumes from its saved position, skipping nothing"),
    PrivateHook("transformers:Trainer", "_load_rng_state", ("checkpoint",),
                "StreamPosition.handed_out: the RNG as the uninterrupted run had it"),
    PrivateHook("transformers:Trainer", "_get_train_sampler", ("train_dataset",),
                "EngineMixin._get_train_sampler: token blocks in accelerate's seeded order, without a list"),
    PrivateHook("transformers:Trainer", "get_batch_samples", ("epoch_iterator", "num_batches", "device"),
                "EngineMixin.get_batch_samples: each batch's stream position"),
    PrivateHook("trl:DPOTrainer", "_prepare_dataset", ("dataset", "processing_class", "args", "dataset_name"),
                "LmforgeDPOTrainer: the data is tokenized by lmforge's templates"),
    PrivateHook("trl:DPOTrainer", "_compute_loss", ("model", "inputs", "return_outputs"),
                "LmforgeDPOTrainer: the reference-free orpo and simpo losses"),
    PrivateHook("trl:KTOTrainer", "_prepare_dataset", ("dataset", "processing_class", "args", "dataset_name"),
                "LmforgeKTOTrainer: seeded KL pairing of lmforge-tokenized rows"),
    PrivateHook("trl:GRPOTrainer", "_tokenize_prompts", ("prompts",),
                "LmforgeGRPOTrainer: prompts already rendered with every special token"),
)


def hook_problems() -> list[str]:
    """Each private hook whose upstream signature differs from the one lmforge was written against."""
    problems = []
    for hook in PRIVATE_HOOKS:
        try:
            found = tuple(inspect.signature(hook.resolve()).parameters)[1:]
        except (ImportError, AttributeError) as err:
            problems.append(f"{hook.owner}.{hook.name} is gone ({err}); used by {hook.used_by}")
            continue
        if found != hook.parameters:
            problems.append(f"{hook.owner}.{hook.name}{found} != {hook.parameters}; used by {hook.used_by}")
    return problems


def attention_registered(name: str) -> bool:
    """Whether transformers' AttentionInterface already knows `name` (its registry is a private dict)."""
    from transformers import AttentionInterface

    return name in AttentionInterface._global_mapping
