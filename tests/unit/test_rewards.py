"""grpo's reward sources: the built-ins' values, user functions by module:function or file.py:function,
and the errors for a reward setup that cannot work."""

import pytest

from lmforge.config import RLArguments
from lmforge.config.parser import parse_train_config
from lmforge.errors import LmforgeError
from lmforge.train.rewards import FormatReward, build_reward_funcs, exact_match, import_function, length_penalty


def test_exact_match_reads_the_answer_tag_and_ignores_case_and_spacing():
    completions = ["The answer is <answer> Paris </answer>", "paris", "<answer>Lyon</answer>", "x"]
    assert exact_match(completions, answer=["Paris", " PARIS ", "Paris", ""]) == [1.0, 1.0, 0.0, None]


def test_format_matches_the_whole_completion():
    reward = FormatReward(r"<think>.*?</think>\s*<answer>.*?</answer>")
    assert reward(["<think>a\nb</think> <answer>1</answer>", "<answer>1</answer>", "<think>a</think><answer>1</answer>!"]) \
        == [1.0, 0.0, 0.0]
    with pytest.raises(LmforgeError, match="not a valid regular expression"):
        FormatReward("(")


def test_length_penalty_starts_at_three_quarters_of_the_limit():
    reward = length_penalty(16)
    assert reward(completion_ids=[[0] * 8, [0] * 12, [0] * 14, [0] * 16]) == [0.0, 0.0, -0.5, -1.0]


def test_user_functions_load_from_a_module_or_a_file(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def short(completions, **kw):\n    return [-len(c) for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    assert import_function("my_rewards:short")(completions=["ab"]) == [-2]
    assert import_function(f"{tmp_path / 'my_rewards.py'}:short")(completions=["abc"]) == [-3]
    with pytest.raises(LmforgeError, match="has no function 'long'"):
        import_function("my_rewards:long")
    with pytest.raises(LmforgeError, match="cannot import no_such_module"):
        import_function("no_such_module:f")
    funcs = build_reward_funcs(RLArguments(reward_funcs="exact_match,format,length,my_rewards:short"), "auto")
    assert [f.__name__ for f in funcs] == ["exact_match", "format", "length", "short"]


@pytest.mark.parametrize("argv, message", [
    (["--stage", "grpo"], "stage grpo needs rewards"),
    (["--stage", "grpo", "--reward_funcs", "accuracy"], "unknown reward 'accuracy'"),
    (["--stage", "grpo", "--reward_funcs", "exact_match", "--reward_weights", "1,2"], "2 values but there are 1"),
    (["--stage", "grpo", "--reward_funcs", "exact_match", "--per_device_train_batch_size", "6"],
     "= 6\\) must be divisible by num_generations 8"),
    (["--stage", "grpo", "--reward_model", "no/such/dir"], "reward_model no/such/dir is not a folder"),
    (["--stage", "sft", "--reward_funcs", "exact_match"], "reward_funcs applies only to stage: grpo or ppo"),
    (["--stage", "grpo", "--reward_funcs", "length", "--num_generations", "1"], "num_generations must be >= 2"),
    (["--stage", "kto", "--pref_loss", "ipo"], "pref_loss applies only to stage: dpo"),
    (["--stage", "dpo", "--kto_chosen_weight", "2"], "kto_chosen_weight applies only to stage: kto"),
    (["--stage", "kto", "--packing", "true"], "packing applies to stage pt and sft"),
])
def test_reward_and_stage_option_errors_say_what_to_change(argv, message):
    with pytest.raises(LmforgeError, match=message):
        parse_train_config([*argv, "--model_name_or_path", "x"])
