"""A pt preprocess run again with nothing changed is answered from the manifest, before the heavy imports; any
change (an option, an input, dataset_info.json, a tokenizer file, a shard) sends it down the full path."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.config.sources import merge_sources
from lmforge.data import shard_cache

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def setup(tiny_llama_dir, tmp_path):
    """A copy of the model and the corpus (their mtimes are changed here), and one finished preprocess."""
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(ROOT / "data" / "finance_corpus.jsonl", data / "corpus.jsonl")
    argv = ["--stage", "pt", "--model_name_or_path", str(model), "--dataset", "corpus.jsonl", "--dataset_dir",
            str(data), "--tokenized_path", str(tmp_path / "tok"), "--cutoff_len", "32", "--output_dir",
            str(tmp_path / "unused")]
    assert main(["preprocess", *argv]) == 0
    return argv, model, data, tmp_path / "tok"


def bump(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def raw_of(argv: list[str]) -> dict:
    return merge_sources(argv)[1]


def test_the_same_command_is_answered_without_importing_torch(setup):
    argv, _, _, tok = setup
    record = json.loads((tok / "shards.json").read_text())[shard_cache.KEY]
    files = [Path(p).name for p, _, _ in record["files"]]
    assert {"corpus.jsonl", "dataset_info.json", "config.json", "tokenizer.json"} <= set(files)
    code = ("import sys; from lmforge.cli import main; code = main(['preprocess', *sys.argv[1:]]); "
            "print('torch imported:', 'torch' in sys.modules); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert "1 token shards (0 written, 1 already complete), 24 documents, 1233 tokens (uint16)" in done.stdout
    assert "torch imported: False" in done.stdout


def test_any_change_takes_the_full_path(setup):
    argv, model, data, tok = setup
    assert shard_cache.up_to_date(raw_of(argv)) is not None
    assert shard_cache.up_to_date(raw_of([*argv, "--preprocessing_num_workers", "2"])) is None
    assert shard_cache.up_to_date(raw_of([*argv, "--overwrite_cache", "true"])) is None
    for change in (lambda: bump(data / "corpus.jsonl"), lambda: bump(model / "tokenizer.json"),
                   lambda: (data / "dataset_info.json").write_text("{}")):
        change()
        assert shard_cache.up_to_date(raw_of(argv)) is None
        assert main(["preprocess", *argv]) == 0  # the full path records the new state
        assert shard_cache.up_to_date(raw_of(argv)) is not None
    with open(tok / "train" / "00000.bin", "r+b") as f:
        f.truncate(10)
    assert shard_cache.up_to_date(raw_of(argv)) is None


def test_a_changed_input_is_tokenized_again(setup, capsys):
    argv, _, data, _ = setup
    with open(data / "corpus.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "One more document."}) + "\n")
    capsys.readouterr()
    assert main(["preprocess", *argv]) == 0
    assert "1 token shards (1 written, 0 already complete), 25 documents" in capsys.readouterr().out
