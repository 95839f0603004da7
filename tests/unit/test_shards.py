"""Token shards for stage pt: the stream they hold, restarts, bad input, and the blocks training reads."""

import errno
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from lmforge.config import DataArguments
from lmforge.data import shard_input, shard_reader, shards
from lmforge.data.catalogue import resolve_datasets
from lmforge.data.pipeline import check_tokenized_path, get_datasets
from lmforge.data.processors import encode_pt_batch
from lmforge.errors import LmforgeError

DOCS = [f"Document {i}: " + "the ledger balances debits and credits " * (1 + i % 5) for i in range(40)]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def specs(tmp_path: Path, *names: str) -> dict:
    return {"train": resolve_datasets(list(names), str(tmp_path))}


def stream(path: Path, split: str = "train") -> np.ndarray:
    manifest = shards.read_manifest(path)
    return np.concatenate([np.fromfile(path / split / s["file"], dtype=manifest["dtype"])
                           for s in manifest["splits"][split]])


def expected_stream(tokenizer, texts: list[str]) -> list[int]:
    """The stream stage pt's Arrow path builds (BOS text EOS, concatenated), before it cuts blocks."""
    return encode_pt_batch({"_text": texts}, tokenizer, block_size=1)["input_ids"]


@pytest.fixture()
def corpus(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", DOCS[:25])
    (tmp_path / "b.txt").write_text("\n".join(DOCS[25:]) + "\n\n")  # a blank line is no document
    return tmp_path


def test_shards_hold_the_stream_stage_pt_tokenizes_with_an_index_each(corpus, smol_tokenizer):
    report = shards.write_shards(specs(corpus, "a.jsonl", "b.txt"), corpus / "tok", smol_tokenizer,
                                 progress_bar=False)
    flat = stream(corpus / "tok")
    assert flat.dtype == np.uint16 and [[t] for t in flat.tolist()] == expected_stream(smol_tokenizer, DOCS)
    assert (report.written, report.reused, report.documents, report.tokens) == (2, 0, 40, len(flat))
    index = json.loads((corpus / "tok" / "train" / "00000.json").read_text())
    assert index["source"] == str((corpus / "a.jsonl").resolve()) and index["documents"] == 25
    assert (index["start"], index["end"]) == (0, (corpus / "a.jsonl").stat().st_size)
    assert index["bytes"] == 2 * index["tokens"] == (corpus / "tok" / "train" / "00000.bin").stat().st_size
    assert index["dtype"] == "uint16" and index["tokenizer"] == smol_tokenizer.name_or_path
    from lmforge.data.pipeline import tokenizer_fingerprint

    assert index["tokenizer_fingerprint"] == tokenizer_fingerprint(smol_tokenizer)
    assert index["encoder"] == report.encoder == "tiktoken"  # SmolLM2's byte-level BPE: the same ids, faster


def test_shards_are_the_same_without_tiktoken(corpus, smol_tokenizer, monkeypatch):
    monkeypatch.setenv("LMFORGE_FAST_BPE", "0")
    report = shards.write_shards(specs(corpus, "a.jsonl", "b.txt"), corpus / "tok", smol_tokenizer,
                                 progress_bar=False)
    assert report.encoder == "tokenizers"
    assert [[t] for t in stream(corpus / "tok").tolist()] == expected_stream(smol_tokenizer, DOCS)


def test_a_large_file_is_cut_at_line_starts_into_shards_of_the_same_stream(corpus, smol_tokenizer):
    whole = shards.write_shards(specs(corpus, "a.jsonl"), corpus / "one", smol_tokenizer, progress_bar=False)
    cut = shards.write_shards(specs(corpus, "a.jsonl"), corpus / "cut", smol_tokenizer, every=500,
                              progress_bar=False)
    assert whole.written == 1 and cut.written > 5
    assert np.array_equal(stream(corpus / "one"), stream(corpus / "cut"))
    raw = (corpus / "a.jsonl").read_bytes()
    indexes = [json.loads(p.read_text()) for p in sorted((corpus / "cut" / "train").glob("*.json"))]
    assert [i["start"] for i in indexes[1:]] == [i["end"] for i in indexes[:-1]]
    assert all(raw[i["start"] - 1:i["start"]] == b"\n" for i in indexes[1:])
    assert sum(i["documents"] for i in indexes) == 25


def test_a_process_pool_writes_the_same_shards(corpus, smol_tokenizer):
    shards.write_shards(specs(corpus, "a.jsonl", "b.txt"), corpus / "serial", smol_tokenizer, every=700,
                        progress_bar=False)
    report = shards.write_shards(specs(corpus, "a.jsonl", "b.txt"), corpus / "pool", smol_tokenizer, workers=2,
                                 every=700, progress_bar=False)
    assert report.written > 4
    files = sorted(p.name for p in (corpus / "serial" / "train").iterdir())
    assert files == sorted(p.name for p in (corpus / "pool" / "train").iterdir())
    for name in files:
        if name.endswith(".bin"):
            assert (corpus / "serial" / "train" / name).read_bytes() == (corpus / "pool" / "train" / name).read_bytes()


def test_a_json_array_file_is_one_shard(tmp_path, smol_tokenizer, monkeypatch):
    (tmp_path / "c.json").write_text(json.dumps([{"text": t} for t in DOCS[:3]], indent=2))
    reads = []
    real = shards.read_documents
    monkeypatch.setattr(shards, "read_documents", lambda task: reads.append(task.kind) or real(task))
    shards.write_shards(specs(tmp_path, "c.json"), tmp_path / "tok", smol_tokenizer, every=50, progress_bar=False)
    assert [[t] for t in stream(tmp_path / "tok").tolist()] == expected_stream(smol_tokenizer, DOCS[:3])
    assert reads == ["json-array"]  # read whole once, by its writer: fast_bpe's check samples no array file


def test_a_rerun_with_everything_present_reads_no_input(corpus, smol_tokenizer, monkeypatch):
    first = shards.write_shards(specs(corpus, "a.jsonl", "b.txt"), corpus / "tok", smol_tokenizer, progress_bar=False)
    monkeypatch.setattr(shards, "read_documents", lambda task: pytest.fail("an input was read again"))
    monkeypatch.setattr(shard_input, "line_starts", lambda *a: pytest.fail("an input was planned again"))
    again = shards.write_shards(specs(corpus, "a.jsonl", "b.txt"), corpus / "tok", smol_tokenizer, progress_bar=False)
    assert (again.written, again.reused, again.tokens) == (0, 2, first.tokens)


def test_an_interrupted_run_keeps_finished_shards_and_redoes_only_the_rest(corpus, smol_tokenizer, monkeypatch):
    out = corpus / "tok"
    shards.write_shards(specs(corpus, "a.jsonl"), out, smol_tokenizer, every=500, progress_bar=False)
    before = stream(out)
    # what a kill leaves: no manifest, the shard being written only under its temporary name, later ones absent
    (out / shards.MANIFEST).unlink()
    (out / "train" / "00003.bin").rename(out / "train" / ".00003.bin.tmp")
    (out / "train" / "00003.json").unlink()
    for later in ("00004.bin", "00004.json", "00005.json"):
        (out / "train" / later).unlink()
    assert shards.is_shard_folder(out)
    check_tokenized_path(out)  # an unfinished folder is preprocess's to finish, not refused
    redone = []
    real = shards.write_shard
    monkeypatch.setattr(shards, "write_shard", lambda task, *a: redone.append(task.number) or real(task, *a))
    report = shards.write_shards(specs(corpus, "a.jsonl"), out, smol_tokenizer, every=500, progress_bar=False)
    assert sorted(redone) == [3, 4, 5] and report.written == 3 and report.reused > 3
    assert np.array_equal(stream(out), before)
    assert not list(out.rglob("*.tmp"))


def test_a_changed_input_is_tokenized_again(corpus, smol_tokenizer):
    out = corpus / "tok"
    shards.write_shards(specs(corpus, "a.jsonl", "b.txt"), out, smol_tokenizer, progress_bar=False)
    write_jsonl(corpus / "a.jsonl", DOCS[:3])
    report = shards.write_shards(specs(corpus, "a.jsonl", "b.txt"), out, smol_tokenizer, progress_bar=False)
    assert (report.written, report.reused, report.documents) == (1, 1, 3 + 15)
    assert [[t] for t in stream(out).tolist()] == expected_stream(smol_tokenizer, DOCS[:3] + DOCS[25:])


def test_invalid_utf8_names_the_file_and_byte(corpus, smol_tokenizer):
    good = (corpus / "a.jsonl").read_bytes()
    (corpus / "bad.jsonl").write_bytes(good + b'{"text": "caf\xe9"}\n')
    with pytest.raises(LmforgeError) as err:
        shards.write_shards(specs(corpus, "bad.jsonl"), corpus / "tok", smol_tokenizer, progress_bar=False)
    assert str(err.value) == (f"{corpus / 'bad.jsonl'}:26: not valid UTF-8 (byte {len(good) + 13}); re-save the file "
                              "as UTF-8")
    assert not (corpus / "tok" / "train" / "00000.bin").exists() and not list(corpus.rglob("*.tmp"))


def test_malformed_json_and_a_text_that_is_no_string_name_file_and_byte(corpus, smol_tokenizer):
    good = (corpus / "a.jsonl").read_bytes()
    (corpus / "bad.jsonl").write_bytes(good + b'{"text": oops}\n')
    with pytest.raises(LmforgeError, match=rf"bad.jsonl: byte {len(good)}: malformed JSON line"):
        shards.write_shards(specs(corpus, "bad.jsonl"), corpus / "tok", smol_tokenizer, progress_bar=False)
    (corpus / "bad.jsonl").write_bytes(good + b'{"text": 3}\n')
    with pytest.raises(LmforgeError, match=rf"bad.jsonl: byte {len(good)}: 'text' must be a string"):
        shards.write_shards(specs(corpus, "bad.jsonl"), corpus / "tok", smol_tokenizer, progress_bar=False)
    write_jsonl(corpus / "other.jsonl", DOCS[:2])
    (corpus / "other.jsonl").write_text((corpus / "other.jsonl").read_text().replace('"text"', '"body"'))
    with pytest.raises(LmforgeError, match="no row has a 'text' field: map the text column with columns.prompt"):
        shards.write_shards(specs(corpus, "other.jsonl"), corpus / "tok", smol_tokenizer, progress_bar=False)


def test_empty_files_among_many_are_skipped_and_counted(corpus, smol_tokenizer):
    (corpus / "many").mkdir()
    for i in range(4):
        write_jsonl(corpus / "many" / f"{i}.jsonl", DOCS[10 * i:10 * i + 10])
    (corpus / "many" / "2.jsonl").write_text("")
    report = shards.write_shards(specs(corpus, "many"), corpus / "tok", smol_tokenizer, progress_bar=False)
    assert report.empty_files == [str(corpus / "many" / "2.jsonl")] and report.documents == 30
    assert "1 empty files skipped" in report.describe()
    (corpus / "none").mkdir()
    (corpus / "none" / "x.jsonl").write_text("")
    with pytest.raises(LmforgeError, match=r"no text to tokenize in .*x.jsonl \(every file is empty\)"):
        shards.write_shards(specs(corpus, "none"), corpus / "tok2", smol_tokenizer, progress_bar=False)


def test_disk_full_says_how_much_is_needed_and_keeps_finished_shards(corpus, smol_tokenizer, monkeypatch):
    out, calls = corpus / "tok", []
    real = shards._write

    def fill_up(handle, data):
        calls.append(len(data))
        if len(calls) == 3:  # the third shard
            raise OSError(errno.ENOSPC, "No space left on device")
        real(handle, data)

    monkeypatch.setattr(shards, "_write", fill_up)
    with pytest.raises(LmforgeError) as err:
        shards.write_shards(specs(corpus, "a.jsonl"), out, smol_tokenizer, every=500, progress_bar=False)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"disk full writing token shards to {out}: about ")
    assert "MB more are needed for the " in message and "the 2 shards finished are kept" in message
    assert sorted(p.name for p in (out / "train").iterdir()) == ["00000.bin", "00000.json", "00001.bin", "00001.json"]
    assert not (out / shards.MANIFEST).exists()
    monkeypatch.setattr(shards, "_write", real)
    report = shards.write_shards(specs(corpus, "a.jsonl"), out, smol_tokenizer, every=500, progress_bar=False)
    assert report.reused == 2 and report.written > 2


def test_shards_of_another_tokenizer_are_refused_naming_both(corpus, smol_tokenizer, llama3_tokenizer):
    out = corpus / "tok"
    shards.write_shards(specs(corpus, "a.jsonl"), out, smol_tokenizer, progress_bar=False)
    for action in (lambda: shards.write_shards(specs(corpus, "a.jsonl"), out, llama3_tokenizer, progress_bar=False),
                   lambda: shard_reader.open_blocks(out, llama3_tokenizer, 16, 0)):
        with pytest.raises(LmforgeError) as err:
            action()
        assert f"holds token shards of tokenizer {smol_tokenizer.name_or_path} (fingerprint" in str(err.value)
        assert f"not of this run's {llama3_tokenizer.name_or_path or type(llama3_tokenizer).__name__}" in str(err.value)
    (out / shards.MANIFEST).unlink()  # unfinished shards are checked too, before any is replaced
    with pytest.raises(LmforgeError, match="holds token shards of tokenizer"):
        shards.write_shards(specs(corpus, "a.jsonl"), out, llama3_tokenizer, progress_bar=False)
    assert (out / "train" / "00000.bin").is_file()
    report = shards.write_shards(specs(corpus, "a.jsonl"), out, llama3_tokenizer, overwrite=True, progress_bar=False)
    assert report.dtype == "uint32" and report.written == 1  # 128,256 ids need 32 bits


def test_blocks_are_slices_of_the_stream_across_shard_boundaries(corpus, smol_tokenizer):
    out = corpus / "tok"
    shards.write_shards(specs(corpus, "a.jsonl", "b.txt"), out, smol_tokenizer, every=300, progress_bar=False)
    flat = stream(out).astype(np.int64)
    train, evald, manifest = shard_reader.open_blocks(out, smol_tokenizer, 37, 0)
    assert evald is None and len(train) == len(flat) // 37 and len(manifest["splits"]["train"]) > 5
    for i in range(len(train)):
        item = train[i]
        assert item["input_ids"] == item["labels"] == flat[37 * i:37 * (i + 1)].tolist()
        assert item["attention_mask"] == [1] * 37
    assert train[-1] == train[len(train) - 1]
    with pytest.raises(IndexError):
        train[len(train)]
    assert len(train._maps) == len(manifest["splits"]["train"]) and pickle.loads(pickle.dumps(train))._maps == {}
    few = shard_reader.open_blocks(out, smol_tokenizer, 37, 0)[0]
    few.MAX_OPEN = 2  # fewer maps than shards: the oldest is closed, reopened when needed again
    order = [len(few) - 1, 0, len(few) // 2, len(few) - 1]
    assert [few[i]["input_ids"] for i in order] == [flat[37 * i:37 * (i + 1)].tolist() for i in order]
    assert len(few._maps) == 2


@pytest.mark.parametrize("total, held", [(10, 1), (10, 3), (11, 5), (100, 7)])
def test_held_out_blocks_are_spread_evenly_and_the_rest_train(total, held):
    holdout = shard_reader.Holdout(total, held)
    trained = [holdout.train_block(j) for j in range(total - held)]
    evaluated = [holdout.eval_block(k) for k in range(held)]
    assert sorted(trained + evaluated) == list(range(total))
    assert trained == sorted(trained) and set(np.diff(evaluated)) <= {total // held}


def test_val_size_holds_out_blocks_and_eval_dataset_is_its_own_split(corpus, smol_tokenizer):
    out = corpus / "tok"
    shards.write_shards(specs(corpus, "a.jsonl"), out, smol_tokenizer, progress_bar=False)
    train, evald, _ = shard_reader.open_blocks(out, smol_tokenizer, 16, 0.25)
    whole, _, _ = shard_reader.open_blocks(out, smol_tokenizer, 16, 0)
    assert len(evald) == len(whole) // 4 and len(train) + len(evald) == len(whole)
    assert evald[0] == whole[len(whole) // len(evald) - 1]
    with pytest.raises(LmforgeError, match="val_size 0.9 holds out .* at most half"):
        shard_reader.open_blocks(out, smol_tokenizer, 16, 0.9)
    both = {"train": specs(corpus, "a.jsonl")["train"], "validation": specs(corpus, "b.txt")["train"]}
    shards.write_shards(both, corpus / "two", smol_tokenizer, progress_bar=False)
    train, evald, _ = shard_reader.open_blocks(corpus / "two", smol_tokenizer, 16, 0.25)  # val_size: eval_dataset wins
    assert len(train) == len(whole) and evald[0]["input_ids"] == stream(corpus / "two", "validation")[:16].tolist()


def test_get_datasets_writes_and_reads_shards_for_pt_and_keeps_arrow_otherwise(corpus, smol_tokenizer):
    args = dict(dataset="a.jsonl,b.txt", dataset_dir=str(corpus), cutoff_len=32)
    data = get_datasets(DataArguments(**args, tokenized_path=str(corpus / "tok")), "pt", 0, smol_tokenizer)
    assert isinstance(data.train, shard_reader.TokenBlocks) and data.summary.source == f"token shards in {corpus / 'tok'}"
    arrow = get_datasets(DataArguments(**args), "pt", 0, smol_tokenizer)  # no tokenized_path: the in-memory path
    assert [data.train[i]["input_ids"] for i in range(len(arrow.train))] == arrow.train["input_ids"]
    assert data.summary.examples == len(data.train) and data.summary.rows == 40
    packed = get_datasets(DataArguments(**args, packing=True, tokenized_path=str(corpus / "packed")), "pt", 0,
                          smol_tokenizer)
    assert "lengths" in packed.train.column_names and (corpus / "packed" / "dataset_dict.json").is_file()
    with pytest.raises(LmforgeError, match="packing cannot read token shards"):
        get_datasets(DataArguments(**args, packing=True, tokenized_path=str(corpus / "tok")), "pt", 0, smol_tokenizer)
    with pytest.raises(LmforgeError, match="holds pt token shards; stage sft needs its own tokenized data"):
        get_datasets(DataArguments(**args, tokenized_path=str(corpus / "tok")), "sft", 0, smol_tokenizer)


@pytest.mark.parametrize("data_seed", [None, 7])
def test_block_order_is_accelerates_seeded_order_without_a_list(data_seed):
    """The same permutation per epoch as SeedableRandomSampler (what training from shards used before, so a
    checkpoint of then resumes in the same order), but the 1M-block pass starts without a million ints."""
    import tracemalloc

    import torch
    from accelerate.data_loader import SeedableRandomSampler

    from lmforge.data.shard_reader import BlockOrder

    torch.manual_seed(3)
    ours, theirs = BlockOrder(1000, data_seed), SeedableRandomSampler(range(1000), data_seed=data_seed)
    for epoch in (0, 1):
        ours.set_epoch(epoch)
        theirs.set_epoch(epoch)
        assert list(ours) == list(theirs)
    assert list(ours) == list(theirs)  # each pass moves on to the next epoch's order by itself

    def first_held(sampler) -> int:
        tracemalloc.start()
        next(iter(sampler))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak

    assert first_held(BlockOrder(1_000_000, data_seed)) < 4e6
    assert first_held(SeedableRandomSampler(range(1_000_000), data_seed=data_seed)) > 30e6
