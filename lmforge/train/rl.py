"""The grpo recipe (stage ppo runs it too): prompts rendered with lmforge's templates, completions sampled
from the policy, scored by a reward model and/or reward functions, and TRL's GRPOTrainer updating the
policy on group-relative advantages (no value model)."""

from __future__ import annotations

import logging
from typing import Any

from trl import GRPOConfig, GRPOTrainer

from lmforge.config import TrainConfig
from lmforge.data.templates import stop_token_ids, template_for
from lmforge.errors import LmforgeError
from lmforge.train.recipe import (
    build_model,
    finish_trainer,
    prepare_run,
    train_and_report,
    trainer_callbacks,
    trl_config,
)
from lmforge.train.rewards import build_reward_funcs
from lmforge.train.trainer import EngineMixin

logger = logging.getLogger(__name__)


class LmforgeGRPOTrainer(EngineMixin, GRPOTrainer):
    """TRL's GRPOTrainer on prompts already rendered by lmforge's template, with lmforge's guarantees."""

    def _tokenize_prompts(self, prompts: list) -> tuple[list[list[int]], None, dict]:
        # the rendered prompt already holds every special token the template wants (BOS included)
        return self.processing_class(text=prompts, add_special_tokens=False)["input_ids"], None, {}


def grpo_config(config: TrainConfig) -> GRPOConfig:
    """TRL's GRPO config from lmforge's rl options."""
    rl = config.rl
    return trl_config(
        GRPOConfig, config.training, num_generations=rl.num_generations, max_completion_length=rl.max_new_tokens,
        temperature=rl.temperature, top_p=rl.top_p, top_k=rl.top_k, beta=rl.kl_beta, loss_type=rl.rl_loss,
        reward_weights=rl.reward_weights, train_sampling_strategy="random")  # TRL's sampler repeats each prompt


def check_answers(config: TrainConfig, data: Any) -> None:
    """exact_match needs reference answers: refuse data without any, before sampling starts."""
    if "exact_match" in config.rl.functions and not any(data.train["answer"]):
        raise LmforgeError("reward_funcs has exact_match but no training row has a reference answer: add an "
                           "`answer` column (or alpaca `output`, or a last assistant turn), or drop exact_match")


def run(config: TrainConfig) -> dict[str, Any]:
    """On-policy RL with GRPO; returns all_results."""
    if config.finetuning.stage == "ppo":
        logger.warning("stage ppo runs GRPO (group-relative advantages, no value model): the installed TRL has "
                       "no PPO trainer")
    fingerprint, resume, tokenizer, data = prepare_run(config)
    check_answers(config, data)
    model = build_model(config, tokenizer)
    template = template_for(config.data, tokenizer)
    model.generation_config.eos_token_id = stop_token_ids(tokenizer, template)  # stop at the end of the turn
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    trainer = LmforgeGRPOTrainer(
        model=model, reward_funcs=build_reward_funcs(config.rl, config.data.template, config.training.device),
        args=grpo_config(config), train_dataset=data.train, eval_dataset=data.eval, processing_class=tokenizer,
        callbacks=trainer_callbacks(config), fingerprint=fingerprint, nan_policy=config.training.nan_policy)
    return train_and_report(config, finish_trainer(trainer), model, data, resume)
