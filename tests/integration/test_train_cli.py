"""`lmforge train` / `preprocess` end to end on tiny random models with a real tokenizer."""

import json
import math
from pathlib import Path

import pytest
import torch
from launch_helpers import free_port
from safetensors.torch import load_file

from lmforge.cli import main

ROOT = Path(__file__).resolve().parents[2]


def train(tmp_path: Path, *args: str, name: str = "out") -> Path:
    out = tmp_path / name
    code = main(["train", "--output_dir", str(out), "--dataset_dir", str(ROOT / "data"), "--logging_steps", "1",
                 "--save_strategy", "no", "--report_to", "none", *args])
    assert code == 0
    return out


def test_sft_lora_writes_every_output(tmp_path, tiny_llama_dir):
    out = train(tmp_path, "--model_name_or_path", str(tiny_llama_dir), "--dataset", "alpaca_demo,sharegpt_demo",
                "--max_steps", "3", "--per_device_train_batch_size", "2", "--val_size", "4", "--lora_rank", "4")
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "chat_template.jinja",
                 "trainer_log.jsonl", "training_loss.png", "eval_loss.png", "all_results.json", "README.md"):
        assert (out / name).is_file(), name
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    train_logs = [r for r in log if "loss" in r]
    assert [r["step"] for r in train_logs] == [1, 2, 3]
    for key in ("loss", "lr", "grad_norm", "tokens_per_second", "elapsed_s"):
        assert all(key in r for r in train_logs), key
    assert all(r["tokens_per_second"] > 0 for r in train_logs)
    results = json.loads((out / "all_results.json").read_text())
    assert results["perplexity"] == pytest.approx(math.exp(results["eval_loss"]))
    assert results["train_loss"] > 0 and results["train_examples"] == 36
    card = (out / "README.md").read_text()
    assert f"base_model: {tiny_llama_dir}" in card and "fine-tuning `lora`" in card and "eval_loss" in card
    # the adapter loads with plain peft, and the tokenizer keeps its chat template
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    AutoPeftModelForCausalLM.from_pretrained(out)
    assert "<|im_start|>" in AutoTokenizer.from_pretrained(out).chat_template


def test_loss_falls_when_overfitting_a_few_rows(tmp_path, tiny_llama_dir):
    out = train(tmp_path, "--model_name_or_path", str(tiny_llama_dir), "--dataset", "alpaca_demo",
                "--max_samples", "4", "--finetuning_type", "full", "--per_device_train_batch_size", "4",
                "--max_steps", "30", "--learning_rate", "1e-2", "--lr_scheduler_type", "constant")
    records = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[0] > 10 and losses[-1] < 0.5 * losses[0], losses


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


def test_gradient_accumulation_equals_a_larger_batch(tmp_path, tiny_llama_dir):
    """4 x batch 1 and 1 x batch 4 give the same SGD update (loss = mean over all loss tokens)."""
    common = ["--model_name_or_path", str(tiny_llama_dir), "--dataset", "alpaca_demo", "--max_samples", "8",
              "--finetuning_type", "full", "--max_steps", "2", "--optim", "sgd", "--learning_rate", "1.0",
              "--lr_scheduler_type", "constant", "--max_grad_norm", "0"]
    big = train(tmp_path, *common, "--per_device_train_batch_size", "4", name="big")
    acc = train(tmp_path, *common, "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "4",
                name="acc")
    a, b = _weights(big), _weights(acc)
    base = load_file(Path(tiny_llama_dir) / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    assert (a[name] - base[name]).abs().max() > 1e-3  # the step moved the weights
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_chunked_loss_trains_exactly_like_the_plain_loss(tmp_path, tiny_llama_dir, caplog):
    common = ["--model_name_or_path", str(tiny_llama_dir), "--dataset", "alpaca_demo", "--max_samples", "8",
              "--finetuning_type", "full", "--max_steps", "2", "--optim", "sgd", "--learning_rate", "1.0",
              "--lr_scheduler_type", "constant", "--max_grad_norm", "0", "--per_device_train_batch_size", "4"]
    with caplog.at_level("INFO", logger="lmforge"):
        a = _weights(train(tmp_path, *common, "--loss_chunking", "on", name="chunked"))
    assert "chunked linear cross-entropy" in caplog.text
    b = _weights(train(tmp_path, *common, "--loss_chunking", "off", name="plain"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_pt_from_scratch_builds_the_architecture_from_yaml(tmp_path, tiny_llama_dir):
    cfg = tmp_path / "pt.yaml"
    cfg.write_text(f"""stage: pt
tokenizer_name_or_path: {tiny_llama_dir}
train_from_scratch: true
model_config: {{model_type: llama, num_hidden_layers: 3, hidden_size: 48, intermediate_size: 96,
               num_attention_heads: 4, num_key_value_heads: 2, tie_word_embeddings: true}}
finetuning_type: full
dataset: finance_corpus
cutoff_len: 64
per_device_train_batch_size: 4
max_steps: 3
""")
    out = tmp_path / "out"
    assert main(["train", str(cfg), "--output_dir", str(out), "--dataset_dir", str(ROOT / "data"),
                 "--save_strategy", "no"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (3, 48, 49152)
    results = json.loads((out / "all_results.json").read_text())
    per_layer = 2 * 48 * 48 + 2 * 24 * 48 + 3 * 48 * 96 + 2 * 48  # q,o; k,v (2 kv heads of 12); mlp; norms
    assert results["parameters_total"] == 49152 * 48 + 3 * per_layer + 48
    assert results["train_examples"] >= 10  # 64-token blocks of the 24-document corpus


def test_continued_pt_with_lora(tmp_path, tiny_llama_dir):
    out = train(tmp_path, "--stage", "pt", "--model_name_or_path", str(tiny_llama_dir), "--dataset", "finance_corpus",
                "--cutoff_len", "64", "--max_steps", "2", "--lora_rank", "4")
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "all_results.json").read_text())["train_tokens"] % 64 == 0


def test_preprocess_then_train_from_tokenized_path(tmp_path, tiny_llama_dir, capsys):
    tokenized = tmp_path / "tok"
    args = ["--model_name_or_path", str(tiny_llama_dir), "--dataset", "messages_demo", "--dataset_dir",
            str(ROOT / "data"), "--tokenized_path", str(tokenized), "--cutoff_len", "64"]
    assert main(["preprocess", *args]) == 0
    assert "10 train examples" in capsys.readouterr().out
    import datasets

    ds = datasets.load_from_disk(str(tokenized))["train"]
    assert ds.column_names == ["input_ids", "attention_mask", "labels"]
    assert all(len(r["input_ids"]) <= 64 and -100 in r["labels"] for r in ds)
    out = tmp_path / "out"
    assert main(["train", *args, "--output_dir", str(out), "--max_steps", "1", "--save_strategy", "no"]) == 0
    assert json.loads((out / "all_results.json").read_text())["train_examples"] == 10


def test_second_run_loads_the_cache_instead_of_tokenizing(tiny_llama_dir):
    from lmforge.config import DataArguments, ModelArguments
    from lmforge.data.pipeline import get_datasets
    from lmforge.model.loader import load_tokenizer

    tok = load_tokenizer(ModelArguments(model_name_or_path=str(tiny_llama_dir)))
    args = DataArguments(dataset="sharegpt_demo", dataset_dir=str(ROOT / "data"), cutoff_len=96)
    first = get_datasets(args, "sft", 7, tok)
    second = get_datasets(args, "sft", 7, tok)
    assert first.summary.source == "tokenized now" and second.summary.source.startswith("cache ")
    assert first.train["input_ids"] == second.train["input_ids"]
    args.overwrite_cache = True
    assert get_datasets(args, "sft", 7, tok).summary.source == "tokenized now"
    args.cutoff_len = 97  # a different option is a different cache entry
    args.overwrite_cache = False
    assert get_datasets(args, "sft", 7, tok).summary.source == "tokenized now"


def test_output_dir_is_never_overwritten_silently(tmp_path, tiny_llama_dir, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["train", "--model_name_or_path", str(tiny_llama_dir), "--dataset", "alpaca_demo", "--dataset_dir",
            str(ROOT / "data"), "--output_dir", str(out), "--max_steps", "1", "--save_strategy", "no"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge: error: output_dir") and "set overwrite_output_dir: true" in err
    assert (out / "keep.txt").read_text() == "mine"
    assert main([*args, "--overwrite_output_dir", "true"]) == 0


EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.yaml") if p.name != "eval.yaml")  # test_eval runs it


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_parses_and_runs_two_steps(tmp_path, tiny_llama_dir, tiny_llama64_dir, example):
    import yaml

    config = yaml.safe_load(example.read_text())
    model = tiny_llama64_dir if config.get("quantization_bit") else tiny_llama_dir  # bnb's CPU kernels: width >= 64
    overrides = ["--model_name_or_path", str(model), "--max_steps", "2", "--dataset_dir", str(ROOT / "data"),
                 "--output_dir", str(tmp_path / "out"), "--save_strategy", "no"]
    if config.get("nnodes", 1) > 1:  # one machine plays node 0 alone; test_distributed runs two node groups
        overrides += ["--nnodes", "1"]
    if config.get("nproc_per_node", 1) > 1:
        overrides += ["--master_port", str(free_port())]
    if config.get("train_from_scratch"):
        overrides += ["--model_config", "{num_hidden_layers: 2, hidden_size: 32, intermediate_size: 64, "
                      "num_attention_heads: 4, num_key_value_heads: 2}"]
    assert main(["train", str(example), *overrides]) == 0
    assert (tmp_path / "out" / "all_results.json").is_file()


@pytest.mark.parametrize("stage, dataset, flag", [("sft", "alpaca_demo,sharegpt_demo", "--neat_packing"),
                                                  ("pt", "finance_corpus", "--packing")])
def test_packed_training_logs_efficiency_and_keeps_examples_apart(tmp_path, tiny_llama_dir, stage, dataset, flag):
    out = train(tmp_path, "--stage", stage, "--model_name_or_path", str(tiny_llama_dir), "--dataset", dataset,
                "--cutoff_len", "256", flag, "true", "--max_steps", "3", "--per_device_train_batch_size", "2",
                "--lora_rank", "4")
    records = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 3
    assert all(0.5 < r["packing_efficiency"] <= 1.0 and 0 <= r["padding_fraction"] < 0.5 for r in steps), steps


def test_pt_packing_keeps_each_document_whole(tiny_llama_dir):
    from lmforge.config import DataArguments, ModelArguments
    from lmforge.data.pipeline import build_datasets
    from lmforge.model.loader import load_tokenizer

    tok = load_tokenizer(ModelArguments(model_name_or_path=str(tiny_llama_dir)))
    args = DataArguments(dataset="finance_corpus", dataset_dir=str(ROOT / "data"), cutoff_len=256, packing=True)
    data = build_datasets(args, "pt", 0, tok)
    for row in data.train:
        starts = [0]
        for n in row["lengths"][:-1]:
            starts.append(starts[-1] + n)
        assert all(row["input_ids"][s] == tok.bos_token_id for s in starts)  # every piece starts a document
        assert all(row["labels"][s] == -100 for s in starts)  # nothing predicts across a boundary
    assert data.summary.extra["packing_efficiency"] > 0.8


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nan_policy(tmp_path, tiny_llama_dir, monkeypatch, policy, capsys):
    """A NaN loss at step 2: stop names the step and saves nothing new; skip counts and continues."""
    from lmforge.train import trainer as trainer_module

    original = trainer_module.linear_cross_entropy
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = original(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(trainer_module, "linear_cross_entropy", poisoned)
    out = tmp_path / "out"
    args = ["train", "--model_name_or_path", str(tiny_llama_dir), "--dataset", "alpaca_demo", "--dataset_dir",
            str(ROOT / "data"), "--output_dir", str(out), "--max_steps", "4", "--finetuning_type", "full",
            "--logging_steps", "1", "--save_strategy", "no", "--nan_policy", policy]
    code = main(args)
    if policy == "stop":
        assert code == 2
        assert "non-finite loss at optimizer step 2, micro-batch 1: stopped" in capsys.readouterr().err
        assert not (out / "model.safetensors").exists()
    else:
        assert code == 0
        records = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
        weights = _weights(out)
        assert all(torch.isfinite(w).all() for w in weights.values())


def test_training_continues_from_an_existing_adapter(tmp_path, tiny_llama_dir):
    first = train(tmp_path, "--model_name_or_path", str(tiny_llama_dir), "--dataset", "alpaca_demo", "--max_steps", "2",
                  "--lora_rank", "4", "--learning_rate", "1e-2", name="first")
    second = train(tmp_path, "--model_name_or_path", str(tiny_llama_dir), "--dataset", "alpaca_demo", "--max_steps", "2",
                   "--adapter_name_or_path", str(first), "--learning_rate", "1e-2", name="second")
    a, b = load_file(first / "adapter_model.safetensors"), load_file(second / "adapter_model.safetensors")
    assert a.keys() == b.keys()  # the same adapter (rank 4), trained further
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert json.loads((second / "adapter_config.json").read_text())["r"] == 4


@pytest.mark.parametrize("method", ["lora", "full"])
def test_gradient_checkpointing_changes_memory_not_results(tmp_path, tiny_llama_dir, method):
    common = ["--model_name_or_path", str(tiny_llama_dir), "--dataset", "alpaca_demo", "--max_samples", "8",
              "--finetuning_type", method, "--max_steps", "2", "--per_device_train_batch_size", "4",
              "--learning_rate", "1e-2"]
    plain = train(tmp_path, *common, name="plain")
    ckpt = train(tmp_path, *common, "--gradient_checkpointing", "true", name="ckpt")

    def losses(out):
        return [json.loads(line)["loss"] for line in (out / "trainer_log.jsonl").read_text().splitlines()
                if '"loss"' in line]

    assert losses(plain) == pytest.approx(losses(ckpt), abs=1e-5)


def test_predict_with_generate_scores_replies_to_the_eval_rows(tmp_path, tiny_llama_dir):
    out = tmp_path / "predict"
    code = main(["train", "--model_name_or_path", str(tiny_llama_dir), "--dataset", "alpaca_demo", "--dataset_dir",
                 str(ROOT / "data"), "--max_samples", "12", "--val_size", "3", "--template", "chatml", "--max_steps",
                 "2", "--output_dir", str(out), "--report_to", "none", "--lora_rank", "4", "--predict_with_generate",
                 "true", "--max_new_tokens", "6"])
    assert code == 0
    rows = [json.loads(line) for line in (out / "generated_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["reference"] and "<|im_start|>assistant" in r["prompt"] for r in rows)
    results = json.loads((out / "all_results.json").read_text())
    assert results["predict_rows"] == 3 and 0 <= results["predict_bleu-4"] <= 100 and "predict_rouge-l" in results


@pytest.mark.parametrize("argv, message", [
    (["--max_new_tokens", "8"], "max_new_tokens applies to stage sft only with predict_with_generate"),
    (["--predict_with_generate", "true"], "predict_with_generate needs eval rows"),
    (["--predict_with_generate", "true", "--val_size", "2", "--packing", "true"], "set packing: false"),
    (["--predict_with_generate", "true", "--val_size", "2", "--stage", "pt"], "applies to stage sft"),
])
def test_predict_with_generate_is_refused_where_it_cannot_work(argv, message):
    from lmforge.config import parse_train_config
    from lmforge.errors import LmforgeError

    with pytest.raises(LmforgeError, match=message):
        parse_train_config(["--output_dir", "o", *argv])
