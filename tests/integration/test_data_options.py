"""Data options end to end: interleaved mixing, worker processes, streaming."""

import json
from pathlib import Path

from lmforge.cli import main
from lmforge.config import DataArguments, ModelArguments
from lmforge.data.pipeline import build_datasets
from lmforge.model.loader import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def tokenizer(tiny_llama_dir):
    return load_tokenizer(ModelArguments(model_name_or_path=str(tiny_llama_dir)))


def test_mix_strategies(tiny_llama_dir):
    tok = tokenizer(tiny_llama_dir)
    common = dict(dataset="alpaca_demo,sharegpt_demo", dataset_dir=str(ROOT / "data"), cutoff_len=256)
    concat = build_datasets(DataArguments(**common), "sft", 0, tok)
    under = build_datasets(DataArguments(**common, mix_strategy="interleave_under"), "sft", 0, tok)
    over = build_datasets(DataArguments(**common, mix_strategy="interleave_over", interleave_probs="0.5,0.5"), "sft", 0, tok)
    assert concat.summary.extra["rows_per_dataset"] == {"alpaca_demo": 30, "sharegpt_demo": 10}
    rows = [tuple(ids) for ids in concat.train["input_ids"]]
    assert len(rows) == len(set(rows)) == 40  # alpaca's 30 rows, then sharegpt's 10
    alpaca, sharegpt = rows[:30], rows[30:]
    # under: one row of each in turn, until sharegpt's 10 run out
    assert [tuple(ids) for ids in under.train["input_ids"]] == [r for pair in zip(alpaca, sharegpt) for r in pair]
    over_rows = [tuple(ids) for ids in over.train["input_ids"]]
    assert set(over_rows) == set(rows) and len(over_rows) > 40  # every row, sharegpt's drawn again


def test_workers_tokenize_exactly_like_one_process(tiny_llama_dir):
    tok = tokenizer(tiny_llama_dir)
    common = dict(dataset="alpaca_demo", dataset_dir=str(ROOT / "data"), cutoff_len=128)
    one = build_datasets(DataArguments(**common), "sft", 0, tok)
    two = build_datasets(DataArguments(**common, preprocessing_num_workers=2), "sft", 0, tok)
    assert one.train["input_ids"] == two.train["input_ids"] and one.train["labels"] == two.train["labels"]


def test_streaming_trains_with_max_steps(tmp_path, tiny_llama_dir, capsys):
    args = ["train", "--model_name_or_path", str(tiny_llama_dir), "--dataset", "messages_demo", "--dataset_dir",
            str(ROOT / "data"), "--streaming", "true", "--save_strategy", "no", "--logging_steps", "1"]
    assert main([*args, "--output_dir", str(tmp_path / "a")]) == 2
    assert "streaming needs max_steps" in capsys.readouterr().err
    assert main([*args, "--output_dir", str(tmp_path / "b"), "--max_steps", "2"]) == 0
    records = [json.loads(line) for line in (tmp_path / "b" / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]


def test_pt_streams_from_jsonl_and_json_arrays_with_the_unstreamed_first_loss(tmp_path, tiny_llama_dir):
    """stage pt with streaming crashed before the first step (the streamed text rows lost their column names).
    Streamed from JSON lines or a JSON array, the first batch is the same blocks as unstreamed and sequential."""
    rows = [json.loads(line) for line in (ROOT / "data" / "finance_corpus.jsonl").read_text().splitlines()]
    (tmp_path / "array.json").write_text(json.dumps(rows))
    losses = {}
    for name, dataset, extra in (("plain", "finance_corpus.jsonl", ["--train_sampling_strategy", "sequential"]),
                                 ("jsonl", "finance_corpus.jsonl", ["--streaming", "true"]),
                                 ("array", str(tmp_path / "array.json"), ["--streaming", "true"])):
        out = tmp_path / name
        assert main(["train", "--stage", "pt", "--model_name_or_path", str(tiny_llama_dir), "--dataset", dataset,
                     "--dataset_dir", str(ROOT / "data"), "--cutoff_len", "32", "--max_steps", "2",
                     "--per_device_train_batch_size", "2", "--save_strategy", "no", "--logging_steps", "1",
                     "--report_to", "none", "--output_dir", str(out), *extra]) == 0
        records = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in records if "loss" in r]
    assert len(losses["jsonl"]) == len(losses["array"]) == 2
    assert abs(losses["jsonl"][0] - losses["plain"][0]) < 1e-5 and abs(losses["array"][0] - losses["plain"][0]) < 1e-5
