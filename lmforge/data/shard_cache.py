"""`lmforge preprocess` run again with nothing changed answers in well under a second.

Checking the token shards themselves is fast (sizes and mtimes, `shards._up_to_date`), but reaching that check
means parsing the typed config and loading the tokenizer, which imports transformers, torch and peft: seconds
of imports to learn that there is nothing to do. So after a pt preprocess the manifest also records the
command that made it: a hash of its raw options (YAML plus overrides, before any defaults) and the size and
mtime of every file the result depends on (the inputs, dataset_info.json, the model's folder or .gguf). A
re-run whose options hash the same and whose files all stat the same is done before those imports. Anything
else (another option, an edited input, a replaced tokenizer file, overwrite_cache) takes the full path, which
decides for itself what to redo. The manifest is rewritten whole by every full run, so a record can never
outlive the shards it describes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

from lmforge import __version__
from lmforge.config.sources import raw_flag
from lmforge.data import shard_input, shards

KEY = "made_by_command"


def options_hash(raw: dict[str, Any]) -> str:
    """The raw options (plus lmforge's and the shard format's versions) as one hash."""
    text = json.dumps({"options": raw, "lmforge": __version__, "shards": shards.VERSION}, sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def model_files(resolved: str | Path, given: str | None) -> list[Path]:
    """What the tokenizer is read from: every file directly in the resolved model folder, and the .gguf the
    user named when the folder is its de-quantized copy."""
    folder = Path(resolved)
    found = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else [folder]
    if given and Path(given).expanduser().is_file() and Path(given).expanduser().resolve() != folder.resolve():
        found.append(Path(given).expanduser().resolve())
    return found


def remember(path: Path, raw: dict[str, Any], depends_on: Iterable[Path]) -> None:
    """Record in the manifest of `path` the command that made it and the files it read."""
    manifest = shards.read_manifest(path)
    if manifest is None:
        return
    inputs = [Path(p) for stats in manifest["inputs"].values() for p, _, _ in stats]
    manifest[KEY] = {"options": options_hash(raw), "files": shard_input.file_stats([*inputs, *depends_on])}
    shards.write_json(path / shards.MANIFEST, manifest)


def up_to_date(raw: dict[str, Any]) -> str | None:
    """What a re-run of a pt preprocess would report when the same command finds the same files, else None."""
    where = raw.get("tokenized_path")
    if not where or raw_flag(raw, "overwrite_cache"):
        return None
    path = Path(str(where))
    manifest = shards.read_manifest(path)
    record = (manifest or {}).get(KEY)
    if not isinstance(record, dict) or record.get("options") != options_hash(raw):
        return None
    if shard_input.file_stats(Path(p) for p, _, _ in record.get("files", [])) != record["files"]:
        return None
    if not shards.shards_whole(path, manifest):
        return None
    totals = manifest["totals"]
    return shards.ShardReport(reused=totals["shards"], documents=totals["documents"], tokens=totals["tokens"],
                              dtype=manifest["dtype"], empty_files=manifest["empty_files"]).describe()
