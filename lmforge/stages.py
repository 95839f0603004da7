"""The stage registry: every training stage described once.

The CLI, the data pipeline, the data doctor, the option checks and `--help` read a stage's entry here
instead of testing its name. Code is named by `module:function` and imported only when the stage
runs, so this module sits below config/ and data/ and imports neither.

Adding a stage: one recipe file (or a function in a family's recipe), one entry in `STAGES`, an
example YAML and tests.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Any, Callable

# (key in trainer_log.jsonl, file written by plot_loss)
LOSS_PLOTS = (("loss", "training_loss.png"), ("eval_loss", "eval_loss.png"))


@dataclass(frozen=True)
class Stage:
    """One training stage: its data shape, its trainer, the options only it reads, and what it reports."""

    name: str
    summary: str
    recipe: str  # module:function taking (config) and returning all_results
    rows: str  # module:function: raw rows -> converted rows, (ds, spec, num_proc, placeholders, skip_invalid)
    encoder: str  # module:function: (DataArguments, tokenizer) -> batched tokenizing function
    aliases: tuple[str, ...] = ()
    options: tuple[str, ...] = ()  # options that only this stage (and others listing them) reads
    packs: bool = False  # `packing` applies
    streams: bool = False  # `streaming` applies (the other stages measure, pair or sample the whole dataset)
    perplexity: bool = False  # eval_loss is a next-token loss, so exp(eval_loss) is reported
    plots: tuple[tuple[str, str], ...] = LOSS_PLOTS
    template: bool = True  # renders conversations with a chat template
    keeps_columns: bool = False  # tokenized rows keep the data's columns (rewards read them)
    samplers: tuple[str, ...] | None = None  # train_sampling_strategy values honoured; () = its own order only
    doctor: bool = False  # `lmforge data check` covers it
    reward_head: bool = False  # the model ends in a scalar score head

    def load(self, attribute: str) -> Callable[..., Any]:
        """The function a `module:function` attribute names."""
        module, _, name = getattr(self, attribute).partition(":")
        return getattr(importlib.import_module(module), name)


PREFERENCE = ("pref_beta", "precompute_ref_log_probs")
DPO_OPTIONS = ("pref_loss", "pref_ftx", "simpo_gamma")
KTO_OPTIONS = ("kto_chosen_weight", "kto_rejected_weight")
RL_OPTIONS = ("reward_model", "reward_funcs", "reward_weights", "reward_format_regex", "num_generations",
              "max_new_tokens", "temperature", "top_p", "top_k", "kl_beta", "rl_loss")

STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("pt", "next-token loss on raw text, cut into cutoff_len blocks (or whole documents with packing)",
          recipe="lmforge.train.causal_lm:run", rows="lmforge.data.formats:to_text",
          encoder="lmforge.data.processors:pt_encoder", packs=True, streams=True, perplexity=True, template=False,
          doctor=True),
    Stage("sft", "supervised fine-tuning on conversations, loss on the assistant's tokens",
          recipe="lmforge.train.causal_lm:run", rows="lmforge.data.formats:to_chat",
          encoder="lmforge.data.processors:sft_encoder", options=("max_new_tokens",), packs=True, streams=True,
          perplexity=True, doctor=True),
    Stage("rm", "a reward model on chosen/rejected pairs (pairwise loss, accuracy and margin)",
          recipe="lmforge.train.preference:run", rows="lmforge.data.pairwise:to_pairs",
          encoder="lmforge.data.pairwise:pairs_encoder", reward_head=True,
          plots=(*LOSS_PLOTS, ("accuracy", "reward_accuracy.png"))),
    Stage("dpo", "preference optimisation on pairs; the loss is pref_loss",
          recipe="lmforge.train.preference:run", rows="lmforge.data.pairwise:to_pairs",
          encoder="lmforge.data.pairwise:pairs_encoder", options=PREFERENCE + DPO_OPTIONS,
          plots=(*LOSS_PLOTS, ("rewards/margins", "reward_margins.png"))),
    Stage("kto", "one response per prompt labelled good or bad",
          recipe="lmforge.train.preference:run", rows="lmforge.data.unpaired:to_unpaired",
          encoder="lmforge.data.unpaired:unpaired_encoder", options=PREFERENCE + KTO_OPTIONS, samplers=(),
          plots=(*LOSS_PLOTS, ("rewards/margins", "reward_margins.png"))),
    Stage("grpo", "on-policy RL: completions sampled from the policy, scored by reward_model and/or reward_funcs",
          recipe="lmforge.train.rl:run", rows="lmforge.data.prompts:to_prompts",
          encoder="lmforge.data.prompts:prompts_encoder", aliases=("ppo",), options=RL_OPTIONS,
          keeps_columns=True, samplers=(), plots=(*LOSS_PLOTS, ("reward", "reward.png"))),
)}
ALIASES = {alias: s.name for s in STAGES.values() for alias in s.aliases}
STAGE_NAMES = (*STAGES, *ALIASES)  # what `stage:` accepts
BOUND_OPTIONS = {o for s in STAGES.values() for o in s.options}  # options some stage owns


def get_stage(name: str) -> Stage:
    """The stage `name` (or an alias such as ppo) names."""
    from lmforge.errors import LmforgeError

    if name in STAGES or name in ALIASES:
        return STAGES[ALIASES.get(name, name)]
    close = difflib.get_close_matches(name, STAGE_NAMES, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise LmforgeError(f"unknown stage '{name}'{hint}: choose one of {', '.join(STAGE_NAMES)}")


def stage_help() -> str:
    """One line per stage, for `--help` and the stage option's own help."""
    lines = [f"{s.name}{' (also ' + ', '.join(s.aliases) + ')' if s.aliases else ''}: {s.summary}"
             for s in STAGES.values()]
    return "; ".join(lines)


def owners_of(option: str) -> list[str]:
    """The stages (and their aliases) that read a stage-bound option."""
    return [n for s in STAGES.values() if option in s.options for n in (s.name, *s.aliases)]
