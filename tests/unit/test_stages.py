"""The stage registry: every entry's code resolves, aliases map, and its option checks read the entries."""

from __future__ import annotations

import pytest

from lmforge.config import parse_train_config
from lmforge.errors import LmforgeError
from lmforge.stages import STAGES, get_stage, owners_of


@pytest.mark.parametrize("name", list(STAGES))
def test_every_stage_names_importable_code(name):
    stage = STAGES[name]
    for attribute in ("recipe", "rows", "encoder"):
        assert callable(stage.load(attribute)), attribute


def test_aliases_and_unknown_stages():
    assert get_stage("ppo") is STAGES["grpo"]
    with pytest.raises(LmforgeError, match="unknown stage 'dop'; did you mean 'dpo'"):
        get_stage("dop")
    assert owners_of("reward_funcs") == ["grpo", "ppo"]
    assert owners_of("pref_beta") == ["dpo", "kto"]


@pytest.mark.parametrize("argv, message", [
    (["--stage", "kto", "--train_sampling_strategy", "random"],
     "stage kto cannot use train_sampling_strategy random (it honours none: it orders the data itself)"),
    (["--stage", "grpo", "--reward_funcs", "length", "--train_sampling_strategy", "group_by_length"],
     "stage grpo cannot use train_sampling_strategy group_by_length"),
    (["--stage", "rm", "--packing", "true"], "packing applies to stage pt and sft, not rm"),
    # a traceback before: dpo's pair lengths and kto's KL pairs are taken over the whole dataset
    (["--stage", "dpo", "--streaming", "true", "--max_steps", "3"],
     "streaming applies to stage pt and sft; stage dpo reads its whole dataset"),
    (["--stage", "kto", "--streaming", "true", "--max_steps", "3"], "stage kto reads its whole dataset"),
    (["--stage", "sft", "--pref_beta", "0.2"], "pref_beta applies only to stage: dpo or kto, but stage is sft"),
])
def test_options_a_stage_would_not_honour_are_refused(argv, message, tmp_path):
    with pytest.raises(LmforgeError) as err:
        parse_train_config([*argv, "--output_dir", str(tmp_path)])
    assert message in str(err.value)


def test_stage_help_lists_every_stage():
    from lmforge.config.parser import format_help

    text = format_help()
    assert all(name in text for name in ("pt:", "sft:", "rm:", "dpo:", "kto:", "grpo (also ppo):"))
