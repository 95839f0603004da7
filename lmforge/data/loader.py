"""Read a dataset's files with `datasets`; when that fails, find the file and line at fault."""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path

import datasets

from lmforge.data.catalogue import DatasetSpec
from lmforge.errors import LmforgeError


def load_raw(spec: DatasetSpec, streaming: bool = False) -> datasets.Dataset | datasets.IterableDataset:
    """All rows of a dataset's files, unconverted."""
    for path in spec.files:
        if path.stat().st_size == 0:
            raise LmforgeError(f"{path}: the file is empty (dataset '{spec.name}')")
        if spec.file_type != "parquet":
            check_utf8(path)  # datasets would store invalid bytes and fail much later
    files = [str(p) for p in spec.files]
    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity_error()
    datasets.logging.get_logger("datasets.packaged_modules.json.json").setLevel(logging.CRITICAL)
    try:
        ds = datasets.load_dataset(spec.file_type, data_files=files, split="train", streaming=streaming)
    except Exception as err:  # datasets wraps parser errors in several types; locate the real fault
        for path in spec.files:
            locate_bad_line(path, spec.file_type)
        raise LmforgeError(f"dataset '{spec.name}': could not read {', '.join(files)}: {_first_line(err)}") from None
    finally:
        datasets.logging.set_verbosity(level)
    if streaming and ds.column_names is None:
        ds = ds._resolve_features()  # the columns are not always known before the first rows are read
    if not streaming and len(ds) == 0:
        raise LmforgeError(f"dataset '{spec.name}': no rows in {', '.join(files)}")
    return ds


def check_utf8(path: Path, chunk: int = 1 << 24) -> None:
    """Stream-decode the file; name the line of the first byte that is not UTF-8."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    lines, offset = 0, 0
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as err:
                line = lines + block[: err.start].count(b"\n") + 1
                raise LmforgeError(f"{path}:{line}: not valid UTF-8 (byte {offset + err.start}); "
                                   "re-save the file as UTF-8") from None
            lines += block.count(b"\n")
            offset += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise LmforgeError(f"{path}: ends in the middle of a UTF-8 character; re-save the file as UTF-8") from None


def locate_bad_line(path: Path, file_type: str) -> None:
    """Raise an error naming `file:line` for the first undecodable or malformed record."""
    if file_type != "json":
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            raise LmforgeError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise LmforgeError(f"{path}:{number}: malformed JSON line ({err.msg})") from None
        if not isinstance(record, dict):
            raise LmforgeError(f"{path}:{number}: expected a JSON object per line, got {type(record).__name__}")


def row_location(spec: DatasetSpec, index: int) -> str:
    """`file:line` for row `index` of a single JSON-lines file, else `dataset 'x' row N`."""
    if len(spec.files) == 1 and spec.file_type == "json":
        path = spec.files[0]
        stat = path.stat()
        lines = _record_lines(str(path), stat.st_size, stat.st_mtime_ns)
        if index < len(lines):
            return f"{path}:{lines[index]}"
    return f"dataset '{spec.name}' row {index + 1}"


@lru_cache(maxsize=8)
def _record_lines(path: str, size: int, mtime_ns: int) -> tuple[int, ...]:
    """Line number of each record of a JSON-lines file (empty for a JSON array), computed once."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        head = handle.read(4096).lstrip()
        if head.startswith("["):
            return ()
        handle.seek(0)
        return tuple(number for number, line in enumerate(handle, start=1) if line.strip())


def _first_line(err: Exception) -> str:
    cause = err
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
    text = str(cause).strip() or type(cause).__name__
    return text.splitlines()[0][:300]
