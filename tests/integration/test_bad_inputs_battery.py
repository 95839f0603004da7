"""The bad-inputs battery: every malformed input gives one line naming the file, line or key and the
fix, no traceback, and leaves every file of the user's unchanged."""

import hashlib
import json
from pathlib import Path

import pytest

from lmforge.cli import main

ROOT = Path(__file__).resolve().parents[2]
GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def jsonl(*rows):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def conv(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


# name: (files to write {relative path: text or bytes}, extra argv, expected substring of the error)
CASES = {
    # --- data
    "truncated json line": ({"d.jsonl": jsonl(GOOD, '{"messages": [{"role": "user"')}, ["--dataset", "{d}/d.jsonl"],
                            "d.jsonl:2: malformed JSON line"),
    "truncated json array": ({"d.json": '[\n {"instruction": "a", "output": "b"},\n {"instruction": '},
                             ["--dataset", "{d}/d.json"], "d.json:3: malformed JSON"),
    "line is not an object": ({"d.jsonl": jsonl(GOOD, "[1, 2]")}, ["--dataset", "{d}/d.jsonl"],
                              "d.jsonl:2: expected a JSON object per line"),
    "content of wrong type": ({"d.jsonl": jsonl(GOOD, {"messages": [{"role": "user", "content": 3},
                                                                    {"role": "assistant", "content": "x"}]})},
                              ["--dataset", "{d}/d.jsonl"], "d.jsonl:2: message content must be a string"),
    "messages not a list": ({"d.jsonl": jsonl({"messages": "hello"})}, ["--dataset", "{d}/d.jsonl"],
                            "d.jsonl:1: 'messages' must be a non-empty list"),
    "unknown role": ({"d.jsonl": jsonl(conv(("user", "a"), ("wizard", "b")))}, ["--dataset", "{d}/d.jsonl"],
                     "d.jsonl:1: unknown role 'wizard'"),
    "consecutive same-role turns": ({"d.jsonl": jsonl(conv(("user", "a"), ("user", "b"), ("assistant", "c")))},
                                    ["--dataset", "{d}/d.jsonl"], "d.jsonl:1: turn 2 is 'user' but 'assistant'"),
    "empty assistant turn": ({"d.jsonl": jsonl(GOOD, conv(("user", "a"), ("assistant", "")))},
                             ["--dataset", "{d}/d.jsonl"], "d.jsonl:2: turn 2: empty assistant message"),
    "no assistant turn": ({"d.jsonl": jsonl(conv(("user", "only a question")))}, ["--dataset", "{d}/d.jsonl"],
                          "d.jsonl:1: no assistant turn to learn from"),
    "tool result first": ({"d.jsonl": jsonl(conv(("tool", "b"), ("assistant", "a")))}, ["--dataset", "{d}/d.jsonl"],
                          "d.jsonl:1: the conversation must open with a user message"),
    "non-utf8 bytes": ({"d.jsonl": b'{"text": "ok"}\n{"text": "caf\xe9"}\n'}, ["--dataset", "{d}/d.jsonl", "--stage", "pt"],
                       "d.jsonl:2: not valid UTF-8"),
    "empty file": ({"d.jsonl": ""}, ["--dataset", "{d}/d.jsonl"], "d.jsonl: the file is empty"),
    "bad alpaca history": ({"d.jsonl": jsonl({"instruction": "a", "output": "b", "history": [["only one"]]})},
                           ["--dataset", "{d}/d.jsonl"], "d.jsonl:1: history must be a list of [user, assistant] pairs"),
    "pt text of wrong type": ({"d.jsonl": jsonl({"text": "fine"}, {"text": 7})}, ["--dataset", "{d}/d.jsonl", "--stage", "pt"],
                              "d.jsonl:2: 'text' must be a string"),
    "plain text for sft": ({"d.txt": "just some text\n"}, ["--dataset", "{d}/d.txt"],
                           "is plain text; stage sft needs alpaca, sharegpt or openai rows"),
    "unknown format": ({"d.jsonl": jsonl({"question": "q", "answer": "a"})}, ["--dataset", "{d}/d.jsonl"],
                       "cannot tell its format from columns"),
    "unsupported file type": ({"d.xml": "<a/>"}, ["--dataset", "{d}/d.xml"], "unsupported file type d.xml"),
    "missing data file": ({}, ["--dataset", "{d}/nope.jsonl"], "nope.jsonl' is neither in"),
    # --- dataset_info.json
    "dataset_info invalid json": ({"dataset_info.json": '{"a": {"file_name": "x.json",}}'},
                                  ["--dataset", "a", "--dataset_dir", "{d}"], "dataset_info.json:1: invalid JSON"),
    "dataset_info missing file_name": ({"dataset_info.json": json.dumps({"a": {"formatting": "alpaca"}})},
                                       ["--dataset", "a", "--dataset_dir", "{d}"], "entry 'a': missing file_name"),
    "dataset_info bad formatting": ({"dataset_info.json": json.dumps({"a": {"file_name": "x.json", "formatting": "chatml"}})},
                                    ["--dataset", "a", "--dataset_dir", "{d}"], "formatting must be one of alpaca, sharegpt"),
    "dataset_info file missing": ({"dataset_info.json": json.dumps({"a": {"file_name": "x.json"}})},
                                  ["--dataset", "a", "--dataset_dir", "{d}"], "entry 'a': file not found"),
    "dataset_info hub dataset": ({"dataset_info.json": json.dumps({"a": {"hf_hub_url": "org/x"}})},
                                 ["--dataset", "a", "--dataset_dir", "{d}"], "names a hub dataset (hf_hub_url)"),
    "missing mapped column": ({"d.jsonl": jsonl({"q": "a", "a": "b"}),
                               "dataset_info.json": json.dumps({"qa": {"file_name": "d.jsonl", "columns": {"prompt": "question"}}})},
                              ["--dataset", "qa", "--dataset_dir", "{d}"], "column 'question' (columns.prompt) not found"),
    # --- config
    "unknown key": ({}, ["--lora_rnak", "8"], "unknown option 'lora_rnak': did you mean 'lora_rank'?"),
    "bad type": ({}, ["--per_device_train_batch_size", "four"], "option 'per_device_train_batch_size' expects int"),
    "bad choice": ({}, ["--finetuning_type", "qlora"], "option 'finetuning_type' expects {lora,freeze,full}"),
    "bf16 and fp16": ({}, ["--bf16", "true", "--fp16", "true"], "bf16 and fp16 are both set"),
    "lora option with freeze": ({}, ["--finetuning_type", "freeze", "--lora_rank", "16"],
                                "lora_rank applies only to finetuning_type: lora"),
    "unknown template": ({}, ["--template", "vicuna9"], "unknown template 'vicuna9': did you mean vicuna?"),
    "yaml syntax error": ({"c.yaml": "stage: sft\nlora_rank: [8\n"}, ["{d}/c.yaml"], "c.yaml:3: invalid YAML"),
    "yaml not a mapping": ({"c.yaml": "- stage\n- sft\n"}, ["{d}/c.yaml"], "the config must be a mapping"),
    "model_config without scratch": ({}, ["--model_config", "{num_hidden_layers: 1}"],
                                     "model_config overrides the architecture and needs train_from_scratch"),
    "val_size too large": ({}, ["--val_size", "500"], "val_size 500.0 leaves no train or no eval rows"),
    "interleave probs count": ({}, ["--dataset", "alpaca_demo,sharegpt_demo", "--mix_strategy", "interleave_under",
                                    "--interleave_probs", "0.5"], "interleave_probs has 1 values but 2 datasets"),
    "interleave probs not numbers": ({}, ["--dataset", "alpaca_demo,sharegpt_demo", "--mix_strategy",
                                          "interleave_under", "--interleave_probs", "a,b"],
                                     "interleave_probs must be numbers (a YAML list or comma-separated)"),
    "interleave_over probability 0": ({}, ["--dataset", "alpaca_demo,sharegpt_demo", "--mix_strategy",
                                           "interleave_over", "--interleave_probs", "1,0"],
                                      "a dataset of probability 0 never is"),
    "val_size fraction above 1": ({}, ["--val_size", "1.5"],
                                  "val_size must be 0, a fraction in (0, 1) or a whole number >= 1 of examples, got 1.5"),
    "batch size zero": ({}, ["--per_device_train_batch_size", "0"], "per_device_train_batch_size must be >= 1, got 0"),
    "accumulation zero": ({}, ["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps must be >= 1, got 0"),
    "model_config negative size": ({}, ["--train_from_scratch", "true", "--model_config", "{hidden_size: -3}"],
                                   "model_config: cannot build the model:"),
    "model_config unknown key": ({}, ["--train_from_scratch", "true", "--model_config", "{hidden_sise: 8}"],
                                 "model_config.hidden_sise: LlamaConfig has no such field"),
    "model_config not a mapping": ({}, ["--train_from_scratch", "true", "--model_config", "[1, 2]"],
                                   "option 'model_config' expects dict, got '[1, 2]'"),
    # --- model directories
    "missing model dir": ({}, ["--model_name_or_path", "{d}/no-model"], "no-model' not found"),
    "missing tokenizer": ({"m/config.json": "@config", "m/model.safetensors": "@weights"},
                          ["--model_name_or_path", "{d}/m"], "cannot load a tokenizer from"),
    "missing weights": ({"m/config.json": "@config", "m/tokenizer.json": "@tokenizer", "m/tokenizer_config.json": "@tokcfg",
                         "m/chat_template.jinja": "@template"},
                        ["--model_name_or_path", "{d}/m"], "no model weights in"),
    "pickle-only weights": ({"m/config.json": "@config", "m/tokenizer.json": "@tokenizer",
                             "m/tokenizer_config.json": "@tokcfg", "m/chat_template.jinja": "@template",
                             "m/pytorch_model.bin": b"\x80\x04fake"},
                            ["--model_name_or_path", "{d}/m"], "only pickle weights (pytorch_model.bin)"),
    "garbage safetensors": ({"m/config.json": "@config", "m/tokenizer.json": "@tokenizer",
                             "m/tokenizer_config.json": "@tokcfg", "m/chat_template.jinja": "@template",
                             "m/model.safetensors": b"not a safetensors file at all"},
                            ["--model_name_or_path", "{d}/m"], "model.safetensors is damaged"),
    "truncated safetensors": ({"m/config.json": "@config", "m/tokenizer.json": "@tokenizer",
                               "m/tokenizer_config.json": "@tokcfg", "m/chat_template.jinja": "@template",
                               "m/model.safetensors": "@weights-truncated"},
                              ["--model_name_or_path", "{d}/m"], "model.safetensors is damaged"),
}


def _write(root: Path, files: dict, tiny: Path) -> None:
    sources = {"@config": tiny / "config.json", "@weights": tiny / "model.safetensors",
               "@tokenizer": tiny / "tokenizer.json", "@tokcfg": tiny / "tokenizer_config.json",
               "@template": tiny / "chat_template.jinja"}
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if content == "@weights-truncated":  # the header whole, the tensor data cut in half
            data = sources["@weights"].read_bytes()
            content = data[: len(data) // 2]
        elif isinstance(content, str) and content in sources:
            content = sources[content].read_bytes()
        path.write_bytes(content if isinstance(content, bytes) else content.encode())


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def test_the_battery_has_at_least_30_cases():
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, tmp_path, tiny_llama_dir, capsys):
    files, extra, expected = CASES[case]
    user = tmp_path / "user"
    user.mkdir()
    _write(user, files, tiny_llama_dir)
    before = _snapshot(user) | _snapshot(ROOT / "data")
    extra = [a.replace("{d}", str(user)) for a in extra]
    config = [a for a in extra if a.endswith(".yaml")]
    options = [a for a in extra if not a.endswith(".yaml")]
    defaults = {"--model_name_or_path": str(tiny_llama_dir), "--dataset": "alpaca_demo",
                "--dataset_dir": str(ROOT / "data"), "--output_dir": str(tmp_path / "out"), "--max_steps": "1"}
    given = dict(zip(options[::2], options[1::2]))
    argv = config + [x for k, v in {**defaults, **given}.items() for x in (k, v)]
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]
    assert last.startswith("lmforge: error: ") and expected in last, err[-600:]
    assert "Traceback" not in err
    assert _snapshot(user) | _snapshot(ROOT / "data") == before  # nothing of the user's changed
    assert not (tmp_path / "out").exists()
