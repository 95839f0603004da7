"""LLaMA-Factory's options: its example configs parse (one trains end to end), every option it documents is
implemented, an alias or refused in one line, and docs/llamafactory_options.md matches the tables."""

import copy
import json
import math
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lmforge.cli import main
from lmforge.config import llamafactory as L
from lmforge.config import parse_train_config
from lmforge.config import parser as P
from lmforge.config.llamafactory import ANY, COMMANDS, LF_INVENTORY, LF_OPTIONS, UNHONOURED, apply_lf_options
from lmforge.config.parser import API_GROUPS, CHAT_GROUPS, EXPORT_GROUPS, all_option_names, build_groups, merge_sources
from lmforge.errors import LmforgeError
from lmforge.eval.runner import parse_eval_config

ROOT = Path(__file__).resolve().parents[2]
LF = ROOT / "tests" / "fixtures" / "lf_examples"
LF_PYTHON = Path("/root/.cache/lmforge-bench/venv-llamafactory/bin/python")
# LLaMA-Factory's demo dataset names -> the demo sets in data/ of the same kind (identity is built in)
DATASETS = {"identity,alpaca_en_demo": "identity,alpaca_demo", "c4_demo": "finance_corpus",
            "dpo_en_demo": "dpo_demo", "kto_en_demo": "kto_demo"}
TRAIN_EXAMPLES = ["train_lora/llama3_lora_sft", "train_lora/llama3_lora_pretrain", "train_lora/llama3_lora_dpo",
                  "train_lora/llama3_lora_kto", "train_lora/llama3_lora_reward", "train_lora/llama3_preprocess",
                  "train_full/llama3_full_sft"]


def example(name: str) -> Path:
    return LF / f"{name}.yaml"


def local_paths(name: str, tmp_path: Path, model: Path) -> list[str]:
    """Command-line overrides that point an LF train example at local files and cap it at 2 steps."""
    import yaml

    config = yaml.safe_load(example(name).read_text())
    argv = [str(example(name)), "--model_name_or_path", str(model), "--dataset", DATASETS[config["dataset"]],
            "--dataset_dir", str(ROOT / "data"), "--output_dir", str(tmp_path / "out"), "--max_steps", "2"]
    if "tokenized_path" in config:
        argv += ["--tokenized_path", str(tmp_path / "tokenized")]
    if "deepspeed" in config:  # lmforge ships the same ZeRO configs
        argv += ["--deepspeed", str(ROOT / config["deepspeed"])]
    return argv


def lf_error(raw: dict, groups: tuple = P.GROUPS) -> str:
    """The error the options in `raw` give the command that reads `groups` (train: with its cross-group checks)."""
    with pytest.raises(LmforgeError) as err:
        if groups == P.GROUPS:
            raw = apply_lf_options(raw, groups)
            P.TrainConfig(*build_groups(raw), explicit=dict(raw))
        else:
            build_groups(dict(raw), groups)
    message = str(err.value)
    assert "\n" not in message
    return message


# --- LLaMA-Factory's example configs --------------------------------------------------------------------------

@pytest.mark.parametrize("name", TRAIN_EXAMPLES)
def test_lf_train_examples_parse_with_local_paths(name, tmp_path):
    config = parse_train_config(local_paths(name, tmp_path, tmp_path / "model"))
    assert config.training.ddp_timeout == (180000000 if "ddp_timeout" in example(name).read_text() else 1800)
    assert config.finetuning.finetuning_type == ("full" if "full" in name else "lora")
    assert "do_train" not in config.explicit  # true is what train does: dropped, never passed on


def test_lf_train_examples_keep_their_meaning(tmp_path):
    reward = parse_train_config(local_paths("train_lora/llama3_lora_reward", tmp_path, tmp_path / "m"))
    assert (reward.finetuning.stage, reward.training.save_only_model, reward.training.dataloader_num_workers) == (
        "rm", False, 4)
    assert reward.training.report_to in ("none", [], ["none"])
    dpo = parse_train_config(local_paths("train_lora/llama3_lora_dpo", tmp_path, tmp_path / "m"))
    assert (dpo.finetuning.pref_beta, dpo.finetuning.pref_loss, dpo.data.template) == (0.1, "sigmoid", "llama3")
    full = parse_train_config(local_paths("train_full/llama3_full_sft", tmp_path, tmp_path / "m"))
    assert full.training.deepspeed.endswith("ds_z3_config.json") and full.training.bf16


@pytest.mark.parametrize("name", ["merge_lora/llama3_lora_sft", "merge_lora/llama3_full_sft"])
def test_lf_merge_examples_parse_as_export(name, tmp_path):
    _, raw = merge_sources([str(example(name)), "--model_name_or_path", str(tmp_path / "m"),
                            "--export_dir", str(tmp_path / "export")])
    if "adapter_name_or_path" in raw:
        raw["adapter_name_or_path"] = str(tmp_path / "adapter")
    model, export = build_groups(raw, EXPORT_GROUPS)
    assert (export.export_size, export.export_device, export.template) == (2.0, "cpu", "llama3")
    assert export.export_dtype == ("bfloat16" if "full" in name else "auto")  # LF's infer_dtype: the saved dtype


@pytest.mark.parametrize("groups", [CHAT_GROUPS, API_GROUPS], ids=["chat", "api"])
@pytest.mark.parametrize("name", ["inference/llama3", "inference/llama3_lora_sft"])
def test_lf_inference_examples_parse_for_chat_and_api(name, groups, tmp_path):
    _, raw = merge_sources([str(example(name)), "--model_name_or_path", str(tmp_path / "m")])
    model, generation, *_ = build_groups(raw, groups)
    assert generation.template == "llama3" and model.model_name_or_path == str(tmp_path / "m")


def test_lf_eval_example_runs_the_choice_benchmark(tmp_path):
    _, data, args = parse_eval_config([str(example("train_lora/llama3_lora_eval")), "--model_name_or_path", "m",
                                       "--adapter_name_or_path", "a", "--save_dir", str(tmp_path / "eval"),
                                       "--task_dir", str(ROOT / "data")])
    assert (args.eval_task, args.task, args.n_shot, args.batch_size, args.lang) == (["choice"], "mmlu_test", 5, 4,
                                                                                    "en")
    assert args.output_dir == str(tmp_path / "eval") and data.template == "fewshot"


@pytest.fixture(scope="module")
def tiny_llama3_dir(llama3_tokenizer, tmp_path_factory):
    """A 2-layer random llama with Llama-3.1's special tokens, which the llama3 template writes and stops at."""
    from conftest import build_tiny_model

    tokenizer = copy.deepcopy(llama3_tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|eom_id|>"]})  # Llama 3.0's tokenizer lacks it
    tokenizer_dir = tmp_path_factory.mktemp("llama3-tokenizer")
    tokenizer.save_pretrained(tokenizer_dir)
    return build_tiny_model(tokenizer_dir, tmp_path_factory.mktemp("tiny-llama3"))


def test_lf_lora_sft_example_trains_two_steps(tmp_path, tiny_llama3_dir):
    # and 2 tokenizing processes instead of LF's 16, on a 2-core test machine (16 take a minute here)
    argv = [*local_paths("train_lora/llama3_lora_sft", tmp_path, tiny_llama3_dir), "--preprocessing_num_workers", "2"]
    assert main(["train", *argv]) == 0
    out = tmp_path / "out"
    results = json.loads((out / "all_results.json").read_text())
    assert math.isfinite(results["train_loss"]) and results["train_loss"] > 0
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    lora_b = {k: v for k, v in load_file(out / "adapter_model.safetensors").items() if "lora_B" in k}
    assert lora_b and all(v.abs().max() > 0 for v in lora_b.values())  # every adapter learned from zero
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8  # lora_rank: 8


# --- the tables -----------------------------------------------------------------------------------------------

def lf_names() -> list[str]:
    return [name for names in LF_INVENTORY.values() for name in names.split()]


def test_every_lf_option_is_implemented_aliased_or_ruled():
    known = {name for groups in COMMANDS.values() for name in all_option_names(groups)}
    uncovered = [n for n in lf_names() if n not in known and n not in P.ALIASES and n not in LF_OPTIONS]
    assert uncovered == []
    assert len(lf_names()) == len(set(lf_names())) == 353
    assert set(LF_OPTIONS) <= set(lf_names())  # no rule for an option LLaMA-Factory does not have
    assert set(L.LF_NOTES) <= known - set(LF_OPTIONS)  # notes are for options lmforge implements by name


@pytest.mark.skipif(not LF_PYTHON.is_file(), reason="LLaMA-Factory 0.9.5 is not installed here")
def test_inventory_matches_the_installed_llamafactory():
    script = ("import dataclasses, json; from llamafactory.hparams import model_args as m, data_args as d, "
              "finetuning_args as f, generating_args as g, evaluation_args as e, training_args as t\n"
              "seen, out = set(), {}\n"
              "for k, c in [('model', m.ModelArguments), ('data', d.DataArguments), "
              "('finetuning', f.FinetuningArguments), ('generating', g.GeneratingArguments), "
              "('evaluation', e.EvaluationArguments), ('training', t.TrainingArguments)]:\n"
              "    out[k] = [x.name for x in dataclasses.fields(c) if x.init and x.name not in seen]\n"
              "    seen |= set(out[k])\n"
              "print(json.dumps(out))")
    proc = subprocess.run([str(LF_PYTHON), "-c", script], capture_output=True, text=True, check=True)
    actual = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {k: sorted(v) for k, v in actual.items()} == {k: sorted(v.split()) for k, v in LF_INVENTORY.items()}


def test_rename_targets_are_options_of_their_command():
    for name, option in LF_OPTIONS.items():
        for command, rule in option.rules.items():
            if rule.rename and command != ANY:
                assert rule.rename in all_option_names(COMMANDS[command]), (name, command)


def test_doc_table_is_in_sync():
    doc = ROOT / "docs" / "llamafactory_options.md"
    assert doc.read_text() == L.lf_table(), "run: python -m lmforge.config.llamafactory --lf-table > " + str(doc)
    assert "| `export_legacy_format` | model | refused |" in doc.read_text()
    assert "| missing |" not in doc.read_text()


def test_the_table_writer_runs_as_a_module(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["llamafactory", "--lf-table"])
    with warnings.catch_warnings():  # runpy: the module is already imported (by lmforge.config)
        warnings.simplefilter("ignore", RuntimeWarning)
        runpy.run_module("lmforge.config.llamafactory", run_name="__main__")
    assert capsys.readouterr().out == L.lf_table()


def ruled() -> list[tuple[str, str]]:
    """(option, a command) for each distinct rule of LF_OPTIONS, where the option is not the command's own."""
    cases, seen = [], set()
    for name, option in LF_OPTIONS.items():
        for command, groups in COMMANDS.items():
            rule = option.rule(command)
            own = name in all_option_names(groups) and name not in UNHONOURED
            if not own and id(rule) not in seen:
                seen.add(id(rule))
                cases.append((name, command))
    return cases


def unaccepted(default: object) -> object:
    """A value other than `default` of the same kind."""
    if isinstance(default, bool) or default is None:
        return {True: False, False: True, None: "x"}[default]
    return default + 3 if isinstance(default, (int, float)) else f"{default}_other"


@pytest.mark.parametrize("name, command", [(n, c) for n, c in ruled() if LF_OPTIONS[n].rule(c).reason
                                           and not LF_OPTIONS[n].rule(c).rename
                                           and not callable(LF_OPTIONS[n].rule(c).accepts)])
def test_each_refused_value_gives_a_one_line_reason(name, command):
    rule = LF_OPTIONS[name].rule(command)
    value = unaccepted(rule.accepts[0] if rule.accepts else None)
    assert value not in rule.accepts
    with pytest.raises(LmforgeError) as err:
        apply_lf_options({name: value}, COMMANDS[command])
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"option '{name}: ") and message.endswith(rule.reason)
    assert f"by lmforge {command}:" in message


@pytest.mark.parametrize("name, command", [(n, c) for n, c in ruled() if not callable(LF_OPTIONS[n].rule(c).accepts)
                                           and LF_OPTIONS[n].rule(c).accepts])
def test_the_accepted_value_changes_nothing(name, command):
    value = LF_OPTIONS[name].rule(command).accepts[0]
    assert apply_lf_options({name: value}, COMMANDS[command]) == {}


# --- options named in the issue ------------------------------------------------------------------------

@pytest.mark.parametrize("raw, groups, reason", [
    ({"infer_backend": "vllm"}, CHAT_GROUPS, "lmforge generates with transformers only"),
    ({"infer_backend": "sglang"}, API_GROUPS, "infer_backend: huggingface"),
    ({"export_legacy_format": True, "export_dir": "e"}, EXPORT_GROUPS, "safetensors only"),
    ({"export_quantization_bit": 4, "export_dir": "e"}, EXPORT_GROUPS, "export_format: gguf with gguf_type"),
    ({"use_unsloth": True}, P.GROUPS, "unsloth is not supported"),
    ({"image_max_pixels": 1000}, P.GROUPS, "multimodal training is not supported yet"),
    ({"video_fps": 4.0}, P.GROUPS, "multimodal training is not supported yet"),
    ({"rope_scaling": "linear"}, P.GROUPS, "RoPE scaling"),
    ({"flash_attn": "fa3"}, P.GROUPS, "use flash_attn: fa2"),
    ({"use_fast_tokenizer": False}, P.GROUPS, "fast (tokenizers) tokenizer"),
    ({"do_train": False}, P.GROUPS, "lmforge train always trains"),
    ({"do_predict": True}, P.GROUPS, "predict_with_generate: true"),
    ({"do_eval": True}, P.GROUPS, "do_eval: true needs val_size or eval_dataset"),
    ({"do_eval": False, "val_size": 0.1}, P.GROUPS, "do_eval: false neither"),
    ({"do_sample": True}, CHAT_GROUPS, "set temperature"),
    ({"buffer_size": 100, "streaming": True, "max_steps": 5}, P.GROUPS, "without a shuffle buffer"),
    ({"finetuning_type": "full", "adapter_name_or_path": "a", "export_dir": "e"}, EXPORT_GROUPS,
     "finetuning_type full or freeze goes without one"),
    ({"disable_tqdm": True}, P.GROUPS, "always shows its progress bar"),
    ({"use_galore": True}, P.GROUPS, "GaLore is not supported"),
    ({"reward_model_type": "api"}, P.GROUPS, "reward_funcs"),
])
def test_named_options_are_refused_with_their_reason(raw, groups, reason):
    assert reason in lf_error(raw, groups)


def test_an_option_of_another_command_says_where_it_belongs():
    message = lf_error({"export_dir": "e"})
    assert message == "option 'export_dir' belongs to lmforge export, not lmforge train: remove it"
    assert "belongs to lmforge train" in lf_error({"lora_rank": 4}, CHAT_GROUPS)


@pytest.mark.parametrize("argv, check", [
    (["--flash_attn", "fa2"], lambda c: c.model.attn_implementation == "flash_attention_2"),
    (["--flash_attn", "disabled"], lambda c: c.model.attn_implementation == "eager"),
    (["--flash_attn", "auto"], lambda c: c.model.attn_implementation == "sdpa"),
    (["--disable_gradient_checkpointing", "false"], lambda c: c.training.gradient_checkpointing is True),
    (["--disable_gradient_checkpointing", "true"], lambda c: c.training.gradient_checkpointing is False),
    (["--use_reentrant_gc", "false"], lambda c: c.training.gradient_checkpointing_kwargs == {"use_reentrant": False}),
    (["--disable_shuffling", "true"], lambda c: c.training.train_sampling_strategy == "sequential"),
    (["--enable_liger_kernel", "true"], lambda c: c.training.use_liger_kernel is True),
    (["--do_train", "--do_eval", "--val_size", "0.1"], lambda c: c.data.val_size == 0.1),
    (["--ddp_timeout", "600"], lambda c: c.training.ddp_timeout == 600),
    (["--save_only_model", "true"], lambda c: c.training.save_only_model is True),
    (["--resize_vocab", "true"], lambda c: c.model.resize_vocab is True),
    (["--infer_backend", "huggingface", "--use_unsloth", "false", "--image_max_pixels", "589824"],
     lambda c: "infer_backend" not in c.explicit and "use_unsloth" not in c.explicit),
    (["--buffer_size", "64"], lambda c: not c.data.streaming),  # LF too reads it only when streaming
])
def test_aliases_and_accepted_values_reach_lmforge_s_options(argv, check):
    assert check(parse_train_config(["--output_dir", "o", *argv]))


def test_explicit_holds_lmforge_s_names():
    config = parse_train_config(["--output_dir", "o", "--flash_attn", "fa2", "--do_train", "true"])
    assert config.explicit["attn_implementation"] == "flash_attention_2" and "flash_attn" not in config.explicit


def test_infer_dtype_is_the_export_dtype_and_eval_s_torch_dtype(tmp_path):
    _, export = build_groups({"infer_dtype": "float16", "export_dir": "e"}, EXPORT_GROUPS)
    assert export.export_dtype == "float16"
    model, _, _ = parse_eval_config(["--infer_dtype", "bfloat16", "--task", "mmlu_test", "--output_dir", "o"])
    assert model.torch_dtype == "bfloat16"
    assert "training loads weights in torch_dtype" in lf_error({"infer_dtype": "float16"})


def test_do_sample_and_temperature():
    _, gen = build_groups({"do_sample": False, "temperature": 0.0}, CHAT_GROUPS)
    assert gen.temperature == 0.0
    _, gen = build_groups({"do_sample": "true", "temperature": "0.7"}, CHAT_GROUPS)
    assert gen.temperature == 0.7
    assert "do_sample: false and temperature: 0.7 disagree" in lf_error({"do_sample": False, "temperature": 0.7},
                                                                         CHAT_GROUPS)


def test_an_alias_and_its_target_must_agree():
    message = lf_error({"flash_attn": "disabled", "attn_implementation": "sdpa"})
    assert message == "flash_attn: disabled and attn_implementation: sdpa disagree: set only attn_implementation"


def test_label_smoothing_is_honoured_or_refused():
    assert parse_train_config(["--output_dir", "o", "--label_smoothing_factor", "0.1"]).training.loss_chunking == "off"
    assert "stage dpo computes its own loss" in lf_error({"label_smoothing_factor": 0.1, "stage": "dpo"})
    assert "set loss_chunking: auto or off" in lf_error({"label_smoothing_factor": 0.1, "loss_chunking": "on"})


def test_eval_task_defaults_to_choice_only_with_a_task():
    _, _, args = parse_eval_config(["--task", "mmlu_test", "--output_dir", "o"])
    assert args.eval_task == ["choice"]
    with pytest.raises(LmforgeError, match="eval needs eval_task"):
        parse_eval_config(["--output_dir", "o"])
