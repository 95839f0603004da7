"""The data pipeline: mixing, max_samples, the val_size split, stat columns, token counts, and the cache
key that decides whether a run tokenizes again."""

import json
import os
from pathlib import Path

import datasets
import pytest

from lmforge.config import DataArguments
from lmforge.data.catalogue import resolve_datasets
from lmforge.data.pipeline import (
    DataSummary,
    LoadReport,
    _finish,
    _split,
    build_datasets,
    cache_key,
    count_tokens,
    get_datasets,
    load_conversations,
    with_length_column,
)
from lmforge.data.processors import Status
from lmforge.errors import LmforgeError


def write_alpaca(path: Path, prefix: str, n: int) -> Path:
    """n alpaca rows `{prefix}{i}` -> `{PREFIX}{i}`, one JSON object a line."""
    path.write_text("".join(json.dumps({"instruction": f"{prefix}{i}", "output": f"{prefix.upper()}{i}"}) + "\n"
                            for i in range(n)))
    return path


@pytest.fixture()
def two_files(tmp_path):
    """a.jsonl with 3 rows (a0..a2), b.jsonl with 2 (b0, b1)."""
    write_alpaca(tmp_path / "a.jsonl", "a", 3)
    write_alpaca(tmp_path / "b.jsonl", "b", 2)
    return tmp_path


def questions(ds):
    return [m[0]["content"] for m in ds["_messages"]]


def load(folder, **options):
    report = LoadReport()
    args = DataArguments(dataset="a.jsonl,b.jsonl", dataset_dir=str(folder), **options)
    return questions(load_conversations(args.dataset, args, "sft", 0, None, report)), report


@pytest.mark.parametrize("strategy, expected", [
    ("concat", ["a0", "a1", "a2", "b0", "b1"]),
    ("interleave_under", ["a0", "b0", "a1", "b1"]),  # stops when b runs out
    ("interleave_over", ["a0", "b0", "a1", "b1", "a2", "b0"]),  # b is repeated until a runs out
])
def test_mix_strategies_give_these_rows(two_files, strategy, expected):
    rows, report = load(two_files, mix_strategy=strategy)
    assert rows == expected
    assert report.rows == {"a.jsonl": 3, "b.jsonl": 2}


def test_interleave_with_probabilities_uses_every_row_and_checks_their_count(two_files):
    rows, _ = load(two_files, mix_strategy="interleave_over", interleave_probs="0.5,0.5")
    assert set(rows) == {"a0", "a1", "a2", "b0", "b1"}
    with pytest.raises(LmforgeError, match="interleave_probs has 3 values but 2 datasets are mixed"):
        load(two_files, mix_strategy="interleave_over", interleave_probs="0.2,0.3,0.5")


def test_max_samples_limits_each_dataset(two_files):
    rows, report = load(two_files, max_samples=2)
    assert rows == ["a0", "a1", "b0", "b1"]
    assert report.rows == {"a.jsonl": 2, "b.jsonl": 2}


@pytest.mark.parametrize("val_size, n_train, n_eval", [(0.25, 6, 2), (0.3, 6, 2), (3, 5, 3), (1, 7, 1)])
def test_val_size_is_a_fraction_or_a_count(val_size, n_train, n_eval):
    train, evald = _split(datasets.Dataset.from_dict({"x": list(range(8))}), val_size, seed=0)
    assert (len(train), len(evald)) == (n_train, n_eval)
    assert sorted([*train["x"], *evald["x"]]) == list(range(8))


def test_no_val_size_keeps_every_row_for_training():
    ds = datasets.Dataset.from_dict({"x": list(range(8))})
    assert _split(ds, 0.0, seed=0) == (ds, None)


@pytest.mark.parametrize("val_size", [0.1, 8, 9])
def test_val_size_that_leaves_a_side_empty_is_refused(val_size):
    with pytest.raises(LmforgeError, match=f"val_size {val_size} leaves no train or no eval rows out of 8"):
        _split(datasets.Dataset.from_dict({"x": list(range(8))}), val_size, seed=0)


def test_build_datasets_splits_tokenized_examples(tmp_path, smol_tokenizer):
    write_alpaca(tmp_path / "a.jsonl", "q", 10)
    args = DataArguments(dataset="a.jsonl", dataset_dir=str(tmp_path), template="chatml", val_size=0.2)
    data = build_datasets(args, "sft", 0, smol_tokenizer)
    assert (len(data.train), len(data.eval)) == (8, 2)
    assert (data.summary.rows, data.summary.examples, data.summary.eval_examples) == (10, 8, 2)
    texts = [smol_tokenizer.decode(ids) for ids in [*data.train["input_ids"], *data.eval["input_ids"]]]
    assert sorted(t.split("user\n")[1].split("<|im_end|>")[0] for t in texts) == sorted(f"q{i}" for i in range(10))


def test_finish_counts_and_drops_by_status():
    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2], [], [3, 4, 5]], "_status": [Status.KEPT, Status.DROPPED, Status.TRUNCATED],
                                     "_loss_tokens": [2, 0, 3]})
    summary = DataSummary()
    out = _finish(ds, summary, "training")
    assert out.column_names == ["input_ids"] and out["input_ids"] == [[1, 2], [3, 4, 5]]
    assert (summary.truncated, summary.dropped, summary.loss_tokens) == (1, 1, 5)
    with pytest.raises(LmforgeError, match="the eval data gave no examples"):
        _finish(ds.select([]), None, "eval")


@pytest.mark.parametrize("columns, tokens", [
    ({"input_ids": [[1, 2], [3]]}, 3),
    ({"prompt_ids": [[1, 2, 3], [4]], "chosen_ids": [[5, 6], [7]], "rejected_ids": [[8], [9, 10]]}, 2 * 4 + 3 + 3),
    ({"prompt_ids": [[1, 2, 3]], "completion_ids": [[4, 5]]}, 5),
    ({"prompt_ids": [[1, 2, 3]], "prompt_length": [3]}, 3),
])
def test_count_tokens_counts_what_the_model_reads(columns, tokens):
    assert count_tokens(datasets.Dataset.from_dict(columns)) == tokens


def test_length_column():
    ds = with_length_column(datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4]]}))
    assert ds["length"] == [3, 1]
    assert with_length_column(ds) is ds


def test_summary_describes_the_counts():
    summary = DataSummary(rows=12, examples=9, truncated=1, dropped=2, tokens=400, loss_tokens=100, eval_examples=1,
                          extra={"packed_rows": 3, "packing_efficiency": 0.8125, "invalid_rows": 1})
    assert summary.describe() == ("9 train examples (12 rows read, 1 invalid rows skipped, 1 truncated, 2 dropped by "
                                  "cutoff_len), 1 eval examples, 400 tokens, 25.0% carry loss, packed into 3 rows at "
                                  "81.2% efficiency [tokenized]")


def key_of(folder, tokenizer, stage="sft", seed=0, **options):
    args = DataArguments(**{"dataset": "a.jsonl", "dataset_dir": str(folder), **options})
    return cache_key(args, stage, seed, resolve_datasets(args.dataset, args.dataset_dir), tokenizer)


def test_cache_key_is_stable_for_the_same_inputs(tmp_path, smol_tokenizer):
    write_alpaca(tmp_path / "a.jsonl", "q", 4)
    key = key_of(tmp_path, smol_tokenizer)
    assert key == key_of(tmp_path, smol_tokenizer)
    assert len(key) == 24
    # how the data is produced, not what: workers and cache handling leave the key alone
    assert key == key_of(tmp_path, smol_tokenizer, preprocessing_num_workers=2, overwrite_cache=True)


@pytest.mark.parametrize("change", [dict(cutoff_len=512), dict(template="chatml"), dict(val_size=0.5),
                                    dict(packing=True), dict(mask_history=True), dict(max_samples=2),
                                    dict(identity_name="Other"), dict(stage="pt"), dict(seed=1)])
def test_cache_key_changes_with_an_option(tmp_path, smol_tokenizer, change):
    write_alpaca(tmp_path / "a.jsonl", "q", 4)
    assert key_of(tmp_path, smol_tokenizer, **change) != key_of(tmp_path, smol_tokenizer)


def test_cache_key_changes_with_the_data_files_content(tmp_path, smol_tokenizer):
    path = write_alpaca(tmp_path / "a.jsonl", "q", 4)
    before = key_of(tmp_path, smol_tokenizer)
    path.write_text(path.read_text().replace("q3", "q3 and more"))
    assert key_of(tmp_path, smol_tokenizer) != before


def test_cache_key_changes_with_content_of_the_same_size_and_mtime(tmp_path, smol_tokenizer):
    path = write_alpaca(tmp_path / "a.jsonl", "q", 4)
    before, stat = key_of(tmp_path, smol_tokenizer), path.stat()
    path.write_text(path.read_text().replace("Q3", "X3"))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert key_of(tmp_path, smol_tokenizer) != before


def test_cache_key_changes_with_the_placeholders_flag(tmp_path, smol_tokenizer):
    write_alpaca(tmp_path / "a.jsonl", "q", 4)
    keys = []
    for flag in (False, True):
        (tmp_path / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "a.jsonl", "placeholders": flag}}))
        keys.append(key_of(tmp_path, smol_tokenizer, dataset="d"))
    assert keys[0] != keys[1]


def test_cache_key_changes_with_the_tokenizers_chat_template(tmp_path, smol_tokenizer):
    from copy import deepcopy

    write_alpaca(tmp_path / "a.jsonl", "q", 4)
    other = deepcopy(smol_tokenizer)
    other.chat_template = "{{ messages[0]['content'] }}"
    assert key_of(tmp_path, other) != key_of(tmp_path, smol_tokenizer)


def test_second_run_loads_the_cache_unless_told_to_tokenize_again(tmp_path, smol_tokenizer):
    write_alpaca(tmp_path / "a.jsonl", "q", 4)
    args = dict(dataset="a.jsonl", dataset_dir=str(tmp_path), template="chatml")
    first = get_datasets(DataArguments(**args), "sft", 0, smol_tokenizer)
    second = get_datasets(DataArguments(**args), "sft", 0, smol_tokenizer)
    again = get_datasets(DataArguments(**args, overwrite_cache=True), "sft", 0, smol_tokenizer)
    assert first.summary.source == "tokenized now" and again.summary.source == "tokenized now"
    assert second.summary.source.startswith("cache ")
    assert list(second.train["input_ids"]) == list(first.train["input_ids"]) and second.summary.examples == 4


def test_tokenized_path_is_loaded_and_its_data_options_ignored(tmp_path, smol_tokenizer):
    write_alpaca(tmp_path / "a.jsonl", "q", 4)
    saved = tmp_path / "tokenized"
    args = dict(dataset="a.jsonl", dataset_dir=str(tmp_path), template="chatml", tokenized_path=str(saved))
    first = get_datasets(DataArguments(**args), "sft", 0, smol_tokenizer)
    assert first.summary.source == "tokenized now" and (saved / "dataset_dict.json").is_file()
    loaded = get_datasets(DataArguments(**args, cutoff_len=8), "sft", 0, smol_tokenizer)
    assert loaded.summary.source == f"loaded from {saved}"
    assert list(loaded.train["input_ids"]) == list(first.train["input_ids"])


def test_tokenized_path_is_written_on_a_cache_hit_too(tmp_path, smol_tokenizer):
    write_alpaca(tmp_path / "a.jsonl", "q", 4)
    args = dict(dataset="a.jsonl", dataset_dir=str(tmp_path), template="chatml")
    get_datasets(DataArguments(**args), "sft", 0, smol_tokenizer)
    saved = tmp_path / "tokenized"
    get_datasets(DataArguments(**args, tokenized_path=str(saved)), "sft", 0, smol_tokenizer)
    assert (saved / "dataset_dict.json").is_file()


def test_tokenized_path_of_the_earlier_layout_and_of_llama_factory_load(tmp_path, smol_tokenizer):
    """lmforge before 0.2 wrote the splits one folder down; LLaMA-Factory writes a DatasetDict at the path itself
    and leaves pt labels to its collator (for pt they are the inputs)."""
    write_alpaca(tmp_path / "a.jsonl", "q", 4)
    args = dict(dataset="a.jsonl", dataset_dir=str(tmp_path), template="chatml")
    data = get_datasets(DataArguments(**args), "sft", 0, smol_tokenizer)
    datasets.DatasetDict({"train": data.train}).save_to_disk(str(tmp_path / "old" / "data"))
    old = get_datasets(DataArguments(**args, tokenized_path=str(tmp_path / "old")), "sft", 0, smol_tokenizer)
    assert list(old.train["labels"]) == list(data.train["labels"])
    blocks = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5, 6]], "attention_mask": [[1] * 3] * 2})
    datasets.DatasetDict({"train": blocks}).save_to_disk(str(tmp_path / "lf"))
    pt = get_datasets(DataArguments(**args, tokenized_path=str(tmp_path / "lf")), "pt", 0, smol_tokenizer)
    assert pt.train["labels"] == [[1, 2, 3], [4, 5, 6]]
    with pytest.raises(LmforgeError, match="has no labels column for stage sft"):
        get_datasets(DataArguments(**args, tokenized_path=str(tmp_path / "lf")), "sft", 0, smol_tokenizer)


def test_a_tokenized_path_holding_other_files_is_never_replaced(tmp_path, smol_tokenizer):
    write_alpaca(tmp_path / "a.jsonl", "q", 4)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    args = DataArguments(dataset="a.jsonl", dataset_dir=str(tmp_path), template="chatml",
                         tokenized_path=str(tmp_path / "mine"))
    with pytest.raises(LmforgeError, match="exists and holds no tokenized dataset"):
        get_datasets(args, "sft", 0, smol_tokenizer)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_preprocess_refuses_a_tokenized_path_that_is_a_file_or_holds_other_files(tmp_path, capsys):
    from lmforge.cli import main

    (tmp_path / "file").write_text("mine")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("mine")
    for target in ("file", "folder"):
        assert main(["preprocess", "--dataset", "a.jsonl", "--output_dir", "o",
                     "--tokenized_path", str(tmp_path / target)]) == 2
        assert "holds no tokenized dataset" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == (tmp_path / "folder" / "notes.txt").read_text() == "mine"
