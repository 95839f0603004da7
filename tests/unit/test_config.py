import dataclasses

import pytest

from lmforge.config import parse_train_config
from lmforge.config.parser import GROUPS, format_help
from lmforge.errors import LmforgeError


def test_yaml_then_cli_override(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("stage: sft\nlearning_rate: 1e-4\nlora_rank: 16\noutput_dir: out\nbf16: false\n")
    c = parse_train_config([str(cfg), "--lora_rank", "4", "--num_train_epochs=2", "--logging_steps", "1"])
    assert c.finetuning.lora_rank == 4  # the command line wins
    assert c.training.learning_rate == pytest.approx(1e-4)  # YAML 1.1 reads 1e-4 as a string
    assert c.training.num_train_epochs == 2.0
    assert c.training.logging_steps == 1
    assert c.config_path == str(cfg)
    assert c.explicit["lora_rank"] == "4"


def test_flag_without_value_is_true_and_warmup_ratio_maps_to_steps():
    c = parse_train_config(["--output_dir", "o", "--train_on_prompt", "--warmup_ratio", "0.1"])
    assert c.data.train_on_prompt is True
    assert c.training.warmup_steps == pytest.approx(0.1)


@pytest.mark.parametrize("argv, message", [
    (["--lora_rnak", "4"], "unknown option 'lora_rnak': did you mean 'lora_rank'?"),
    (["--finetuning_type", "full", "--lora_rank", "4"], "lora_rank applies only to finetuning_type: lora"),
    (["--finetuning_type", "lora", "--freeze_trainable_layers", "1"], "only to finetuning_type: freeze"),
    (["--bf16", "--fp16"], "bf16 and fp16 are both set"),
    (["--lora_rank", "abc"], "option 'lora_rank' expects int, got 'abc'"),
    (["--stage", "rlhf"], "option 'stage' expects {pt,sft,rm,dpo,kto,grpo,ppo}"),
    (["--train_on_prompt", "--mask_history"], "contradict"),
    (["--cutoff_len", "1"], "cutoff_len must be at least 2"),
    (["--warmup_ratio", "0.1", "--warmup_steps", "5"], "warmup_ratio and warmup_steps are both set"),
    (["--interleave_probs", "a,b"], "interleave_probs must be numbers (a YAML list or comma-separated), got ['a', 'b']"),
    (["--interleave_probs", "0.5,-0.5"], "interleave_probs must be numbers >= 0"),
    (["--interleave_probs", "0,0"], "summing to more than 0"),
    (["--interleave_probs", "nan,1"], "interleave_probs must be finite numbers"),
    (["--reward_weights", "1,x"], "reward_weights must be numbers"),
    (["--val_size", "1.5"], "val_size must be 0, a fraction in (0, 1) or a whole number >= 1"),
    (["--val_size", "-0.1"], "val_size must be 0, a fraction in (0, 1) or a whole number >= 1"),
    (["--per_device_train_batch_size", "0"], "per_device_train_batch_size must be >= 1, got 0"),
    (["--per_device_eval_batch_size", "0"], "per_device_eval_batch_size must be >= 1, got 0"),
    (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps must be >= 1, got 0"),
])
def test_bad_options_name_the_fix(argv, message):
    with pytest.raises(LmforgeError) as err:
        parse_train_config(["--output_dir", "o", *argv])
    assert message in str(err.value)


@pytest.mark.parametrize("val_size", ["0", "0.25", "3", "3.0"])
def test_val_size_accepts_zero_fractions_and_whole_counts(val_size):
    assert parse_train_config(["--output_dir", "o", "--val_size", val_size]).data.val_size == float(val_size)


def test_interleave_probs_are_parsed_once_as_numbers():
    c = parse_train_config(["--output_dir", "o", "--interleave_probs", "2,1,0"])
    assert c.data.interleave_probs == [2.0, 1.0, 0.0]


def test_list_options_are_lists_from_yaml_lists_and_comma_strings(tmp_path):
    cfg = tmp_path / "lists.yaml"
    cfg.write_text("dataset: [alpaca_demo, sharegpt_demo]\nlora_target: q_proj, v_proj\ninterleave_probs: [1, 0.5]\n"
                   "adapter_name_or_path: a,b\n")
    c = parse_train_config([str(cfg), "--output_dir", "o", "--eval_dataset", "x.jsonl"])
    assert c.data.dataset == ["alpaca_demo", "sharegpt_demo"] and c.data.eval_dataset == ["x.jsonl"]
    assert c.finetuning.lora_target == ["q_proj", "v_proj"] and c.finetuning.additional_target is None
    assert c.data.interleave_probs == [1.0, 0.5] and c.model.adapter_name_or_path == ["a", "b"]
    assert parse_train_config(["--output_dir", "o", "--interleave_probs", "1"]).data.interleave_probs == [1.0]
    assert parse_train_config(["--output_dir", "o", "--interleave_probs", "0.5,"]).data.interleave_probs == [0.5]
    rl = parse_train_config(["--output_dir", "o", "--stage", "grpo", "--reward_funcs", "length, format",
                             "--reward_weights", "1,2", "--dataset", "rl_demo"]).rl
    assert rl.reward_funcs == ["length", "format"] and rl.reward_weights == [1.0, 2.0]


def test_yaml_errors_name_file_and_line(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("stage: sft\nlora_rank: [1\n")
    with pytest.raises(LmforgeError, match=r"bad.yaml:\d+: invalid YAML"):
        parse_train_config([str(cfg)])
    with pytest.raises(LmforgeError, match="config file not found"):
        parse_train_config([str(tmp_path / "missing.yaml")])


def test_help_lists_every_option_with_type_and_default():
    text = format_help()
    for cls in GROUPS:
        for f in dataclasses.fields(cls):
            if f.init:
                assert f"--{f.name} " in text, f.name
    assert "--lora_rank int (default: 8)" in text
    assert "--template str (default: 'auto')" in text
