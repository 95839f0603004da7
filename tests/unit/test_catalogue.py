import json

import pytest

from lmforge.data.catalogue import resolve_datasets
from lmforge.data.formats import to_conversations
from lmforge.data.loader import load_raw
from lmforge.errors import LmforgeError


def load(names, dataset_dir, stage="sft"):
    spec = resolve_datasets(names, str(dataset_dir))[0]
    return to_conversations(load_raw(spec), spec, stage)


def test_catalogue_alpaca_with_history_and_system(data_dir):
    ds = load("alpaca_demo", data_dir)
    assert len(ds) == 30
    row = ds[1]
    assert [m["role"] for m in row["_messages"]] == ["user", "assistant", "user", "assistant"]
    assert row["_messages"][0]["content"] == "Hi!"
    assert row["_messages"][2]["content"] == "What is the capital of France?"
    assert ds[2]["_messages"][0]["content"] == "Translate the sentence into French.\nGood morning, how are you?"
    assert ds[3]["_system"] == "You are a concise financial tutor."


def test_sharegpt_and_openai_give_the_same_conversations(data_dir):
    a, b = load("sharegpt_demo", data_dir), load("messages_demo", data_dir)
    assert a["_messages"] == b["_messages"] and a["_system"] == b["_system"]
    assert a[1]["_system"] == "You answer in one sentence."
    # a plain path is detected as OpenAI messages without any catalogue entry
    c = load(str(data_dir / "messages_demo.jsonl"), data_dir)
    assert c["_messages"] == b["_messages"]


def test_pt_text(data_dir):
    ds = load("finance_corpus", data_dir, stage="pt")
    assert len(ds) == 24 and ds[0]["_text"].startswith("A bond is a debt security.")


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("rows, message", [
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, '{"messages": [',],
     r"bad.jsonl:2: malformed JSON line"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                    {"role": "assistant", "content": "c"}]}], r"bad.jsonl:1: turn 2 is 'user' but 'assistant'"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]}],
     r"bad.jsonl:1: turn 2: empty assistant message"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
      {"messages": [{"role": "wizard", "content": "a"}]}], r"bad.jsonl:2: unknown role 'wizard'"),
])
def test_bad_rows_name_file_and_line(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(LmforgeError, match=message):
        load(str(path), tmp_path)


def test_missing_column_names_dataset_and_mapping(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    (tmp_path / "dataset_info.json").write_text(json.dumps(
        {"qa": {"file_name": "d.jsonl", "columns": {"prompt": "instruction", "response": "answer"}}}))
    with pytest.raises(LmforgeError, match=r"dataset 'qa': column 'instruction' \(columns.prompt\) not found.*"
                                           r"fix the `columns` mapping of 'qa'"):
        load("qa", tmp_path)


def test_unknown_dataset_hub_dataset_and_empty_file(tmp_path):
    (tmp_path / "dataset_info.json").write_text(json.dumps({"hub": {"hf_hub_url": "org/data"}, "e": {"file_name": "e.json"}}))
    with pytest.raises(LmforgeError, match=r"dataset 'nope' is neither in .*known: e, hub"):
        resolve_datasets("nope", str(tmp_path))
    with pytest.raises(LmforgeError, match="names a hub dataset"):
        resolve_datasets("hub", str(tmp_path))
    (tmp_path / "e.json").write_text("")
    with pytest.raises(LmforgeError, match=r"e.json: the file is empty"):
        load("e", tmp_path)


def test_non_utf8_bytes_are_located(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(LmforgeError, match=r"latin.jsonl:2: not valid UTF-8"):
        load(str(path), tmp_path, stage="pt")


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_csv_and_parquet_files_load_like_json(tmp_path, data_dir, suffix):
    import datasets

    reference = load("alpaca_demo", data_dir)
    rows = json.loads((data_dir / "alpaca_demo.json").read_text())
    table = datasets.Dataset.from_list([{k: r.get(k, "") for k in ("instruction", "input", "output")} for r in rows])
    path = tmp_path / f"alpaca.{suffix}"
    table.to_csv(str(path)) if suffix == "csv" else table.to_parquet(str(path))
    ds = load(str(path), tmp_path)
    assert len(ds) == 30
    assert ds[0]["_messages"] == reference[0]["_messages"]
