"""The rm, dpo and kto recipes: lmforge's data (pairs or labelled responses rendered with the chat template
and masked as in SFT), model and outputs, trained by TRL's RewardTrainer, DPOTrainer and KTOTrainer.

dpo's pref_loss sigmoid, ipo and hinge are TRL's own losses against a reference model (with LoRA, the
base model with the adapter disabled: no second copy); orpo and simpo are reference-free and computed
here from the same length-normalised log-probabilities TRL's fused head returns.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, RewardConfig, RewardTrainer

from lmforge.config import TrainConfig
from lmforge.model.loader import load_model
from lmforge.train.recipe import (
    build_model,
    finish_trainer,
    prepare_run,
    train_and_report,
    trainer_callbacks,
    trl_config,
)
from lmforge.train.trainer import EngineMixin

REFERENCE_FREE = ("orpo", "simpo")


class LmforgeRewardTrainer(EngineMixin, RewardTrainer):
    """TRL's RewardTrainer (pairwise loss, accuracy and margin metrics) with lmforge's guarantees."""


class LmforgeDPOTrainer(EngineMixin, DPOTrainer):
    """TRL's DPOTrainer on lmforge's tokenized pairs, plus the reference-free orpo and simpo losses."""

    def __init__(self, *args: Any, pref_loss: str = "sigmoid", pref_ftx: float = 0.0, simpo_gamma: float = 0.5,
                 fresh_adapter: bool = True, **kwargs: Any):
        self.pref_loss, self.pref_ftx, self.simpo_gamma = pref_loss, pref_ftx, simpo_gamma
        super().__init__(*args, **kwargs)
        if pref_loss in REFERENCE_FREE:
            self.ref_model = None  # never used
        peft_config = getattr(self.model, "peft_config", {})
        if fresh_adapter and "ref" in peft_config:
            # TRL copies the adapter as the reference; a new adapter (lora_B = 0) equals the base model, so the
            # reference is the adapter disabled: no copy, and no ref/ folder in the output
            self.model.delete_adapter("ref")

    def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
        return dataset  # prompt_ids / chosen_ids / rejected_ids from lmforge's templates and masks

    def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool) -> Any:
        if self.pref_loss not in REFERENCE_FREE:
            return super()._compute_loss(model, inputs, return_outputs)
        chosen_avg, rejected_avg = self.average_logps(model, inputs)
        loss = reference_free_loss(self.pref_loss, chosen_avg, rejected_avg, self.beta, self.simpo_gamma,
                                   self.pref_ftx)
        self._log_pair_metrics(self.beta * chosen_avg.detach(), self.beta * rejected_avg.detach())
        return (loss, None) if return_outputs else loss

    def average_logps(self, model: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean log-probability per answer token, (chosen, rejected), each [batch]."""
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels,
                        use_cache=False, fused_lm_head=True)
        mask = completion_mask[..., 1:]  # [2B, T-1]: positions that predict an answer token
        logps = (outputs.log_probs[:, -mask.size(1):] * mask).sum(1) / mask.sum(1).clamp(min=1)
        return logps.chunk(2, dim=0)  # the batch is [chosen..., rejected...]

    def _log_pair_metrics(self, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> None:
        mode = "train" if self.model.training else "eval"
        gather = self.accelerator.gather
        self._metrics[mode]["rewards/chosen"].append(gather(chosen_rewards).mean().item())
        self._metrics[mode]["rewards/rejected"].append(gather(rejected_rewards).mean().item())
        self._metrics[mode]["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
        self._metrics[mode]["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())


class LmforgeKTOTrainer(EngineMixin, KTOTrainer):
    """TRL's KTOTrainer on lmforge's tokenized (prompt, completion, label) rows."""

    def __init__(self, *args: Any, fresh_adapter: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if fresh_adapter and "ref" in getattr(self.model, "peft_config", {}):
            self.model.delete_adapter("ref")  # as in LmforgeDPOTrainer: the reference is the adapter disabled

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        if not self.calculate_KL:
            return dataset
        # KTO's KL term scores each prompt with another row's completion: TRL pairs neighbours inside a batch of
        # a fixed order, so shuffle once (seeded) and rotate the completions by one within each batch
        dataset = dataset.shuffle(seed=args.seed).flatten_indices()
        return dataset.map(lambda b: {"KL_completion_ids": b["completion_ids"][-1:] + b["completion_ids"][:-1]},
                           batched=True, batch_size=args.per_device_train_batch_size, desc="Pairing KL completions")


def reference_free_loss(kind: str, chosen: torch.Tensor, rejected: torch.Tensor, beta: float, gamma: float,
                        ftx: float) -> torch.Tensor:
    """orpo: -mean log p(chosen) + beta * -logsigmoid(log odds(chosen) - log odds(rejected));
    simpo: -logsigmoid(beta * (chosen - rejected) - gamma) (+ ftx * the SFT term). Inputs are the
    per-answer mean log-probabilities, [batch]."""
    nll = -chosen
    if kind == "orpo":
        log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
        return (nll - beta * F.logsigmoid(log_odds)).mean()
    loss = -F.logsigmoid(beta * (chosen - rejected) - gamma)
    return (loss + ftx * nll).mean()


def with_pair_lengths(ds: Any) -> Any:
    """A `length` column (prompt plus the longer answer) for the length-grouped sampler."""
    if ds is None:
        return None
    return ds.map(lambda r: {"length": len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"]))},
                  desc="Measuring pairs")


def reward_pairs(ds: Any) -> Any:
    """prompt_ids + chosen_ids / rejected_ids -> the two whole sequences RewardTrainer scores."""
    if ds is None:
        return None
    return ds.map(lambda r: {"chosen_ids": r["prompt_ids"] + r["chosen_ids"],
                             "rejected_ids": r["prompt_ids"] + r["rejected_ids"]},
                  remove_columns=["prompt_ids"], desc="Joining prompts and answers")


def run(config: TrainConfig) -> dict[str, Any]:
    """Train a reward model (stage rm) or a policy on preferences (dpo, kto); returns all_results."""
    fingerprint, resume, tokenizer, data = prepare_run(config)
    args, f = config.training, config.finetuning
    if args.train_sampling_strategy == "group_by_length" and f.spec.samplers is None:  # similar lengths share a batch
        data.train, data.eval = with_pair_lengths(data.train), with_pair_lengths(data.eval)
    model = build_model(config, tokenizer)
    common = {"model": model, "processing_class": tokenizer, "callbacks": trainer_callbacks(config),
              "fingerprint": fingerprint, "nan_policy": args.nan_policy}
    if f.stage == "rm":
        model.config.pad_token_id = tokenizer.pad_token_id  # the score is read at the last non-pad token
        trainer = LmforgeRewardTrainer(args=trl_config(RewardConfig, args, max_length=None),
                                       train_dataset=reward_pairs(data.train), eval_dataset=reward_pairs(data.eval),
                                       **common)
    elif f.stage == "kto":
        trainer = LmforgeKTOTrainer(ref_model=_reference_model(config, tokenizer), args=_kto_config(config),
                                    train_dataset=data.train, eval_dataset=data.eval,
                                    fresh_adapter=not config.model.adapter_name_or_path, **common)
    else:
        trainer = LmforgeDPOTrainer(ref_model=_reference_model(config, tokenizer), args=_dpo_config(config),
                                    train_dataset=data.train, eval_dataset=data.eval, pref_loss=f.pref_loss,
                                    pref_ftx=f.pref_ftx, simpo_gamma=f.simpo_gamma,
                                    fresh_adapter=not config.model.adapter_name_or_path, **common)
    return train_and_report(config, finish_trainer(trainer), model, data, resume)


def _dpo_config(config: TrainConfig) -> DPOConfig:
    f = config.finetuning
    losses, weights = ([f.pref_loss], [1.0]) if f.pref_loss not in REFERENCE_FREE else (["sigmoid"], [1.0])
    if f.pref_ftx and f.pref_loss not in REFERENCE_FREE:
        losses, weights = losses + ["sft"], weights + [f.pref_ftx]
    return trl_config(DPOConfig, config.training, beta=f.pref_beta, loss_type=losses, loss_weights=weights,
                      max_length=None, precompute_ref_log_probs=f.precompute_ref_log_probs)


def _kto_config(config: TrainConfig) -> KTOConfig:
    f = config.finetuning
    return trl_config(KTOConfig, config.training, beta=f.pref_beta, desirable_weight=f.kto_chosen_weight,
                      undesirable_weight=f.kto_rejected_weight, max_length=None,
                      precompute_ref_log_probs=f.precompute_ref_log_probs,
                      train_sampling_strategy="sequential")  # the order _prepare_dataset fixed


def _reference_model(config: TrainConfig, tokenizer: Any) -> Any:
    """A frozen copy of the starting model for full/freeze dpo; None where none is needed (LoRA: the
    adapter disabled; orpo/simpo: no reference; precomputed reference log-probs)."""
    f = config.finetuning
    if f.finetuning_type == "lora" or f.pref_loss in REFERENCE_FREE or f.precompute_ref_log_probs:
        return None
    reference = load_model(config.model, tokenizer)
    reference.requires_grad_(False)
    return reference.eval()
