"""Every bad input gives one line `lmforge: error: ...` naming what to change, exit code 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def bad_files(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [\n')
    (tmp_path / "qa.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    (tmp_path / "dataset_info.json").write_text(json.dumps(
        {"qa": {"file_name": "qa.jsonl", "columns": {"prompt": "instruction", "response": "answer"}}}))
    return tmp_path


CASES = {
    "missing model dir": (["--model_name_or_path", "/nonexistent/model"], "model '/nonexistent/model' not found"),
    "missing data file": (["--dataset", "nope.jsonl"], "dataset 'nope.jsonl' is neither in"),
    "malformed jsonl line": (["--dataset", "{tmp}/broken.jsonl"], "broken.jsonl:2: malformed JSON line"),
    "missing column": (["--dataset", "qa", "--dataset_dir", "{tmp}"],
                       "column 'instruction' (columns.prompt) not found"),
    "unknown template": (["--template", "vicuna9"], "unknown template 'vicuna9': did you mean vicuna? `lmforge templates`"),
    "unknown option": (["--lora_rnak", "8"], "did you mean 'lora_rank'?"),
    "bf16 and fp16": (["--bf16", "true", "--fp16", "true"], "bf16 and fp16 are both set"),
    "lora option with full": (["--finetuning_type", "full", "--lora_alpha", "32"],
                              "lora_alpha applies only to finetuning_type: lora"),
    "no output_dir": (["--output_dir", None], "output_dir is required"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_line_error(case, bad_files, tiny_llama_dir, capsys):
    extra, message = CASES[case]
    args = {"--model_name_or_path": str(tiny_llama_dir), "--dataset": "alpaca_demo", "--dataset_dir": str(ROOT / "data"),
            "--output_dir": str(bad_files / "out"), "--max_steps": "1"}
    for key, value in zip(extra[::2], extra[1::2]):
        args[key] = value.replace("{tmp}", str(bad_files)) if value else None
    argv = [x for k, v in args.items() if v is not None for x in (k, v)]
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # progress bars of the loading may come before it
    assert last.startswith("lmforge: error: ") and message in last, err
    assert "Traceback" not in err and "ERROR" not in err
    assert not (bad_files / "out").exists()


def test_console_script_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lmforge", "train", "--lora_rnak", "8"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "lmforge: error: unknown option 'lora_rnak': did you mean 'lora_rank'?"


def test_help_documents_every_option():
    proc = subprocess.run([sys.executable, "-m", "lmforge", "train", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    for option in ("--stage {pt,sft,rm,dpo,kto,grpo,ppo}", "--reward_funcs list[str] (default: None)",
                   "--lora_target list[str] (default: ['all'])", "--cutoff_len int (default: 2048)",
                   "whole turns are kept", "--gradient_checkpointing", "--overwrite_output_dir"):
        assert option in proc.stdout
