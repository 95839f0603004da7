"""The raw side of stage pt's token shards: which byte ranges of which input files become which shard
(`plan_split`: line-aligned tasks of about SPLIT_BYTES), and the documents each range holds, read BATCH_BYTES
at a time (`read_documents`), with invalid UTF-8 and malformed JSON named by file and byte."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from lmforge.errors import LmforgeError

SPLIT_BYTES = 16 << 20  # input text per shard: ~4M tokens, parallel work and restart granularity
BATCH_BYTES = 1 << 20  # text tokenized at a time by one worker


@dataclass(frozen=True)
class ShardTask:
    """One shard to write: a line-aligned byte range of one input file."""

    split: str
    number: int
    source: str
    kind: str  # jsonl, json-array or text
    column: str  # the text field of json rows
    start: int
    end: int
    size: int  # the source's size and mtime when planned: a changed source is tokenized again
    mtime_ns: int

    @property
    def name(self) -> str:
        return f"{self.number:05d}"


# --- planning ---------------------------------------------------------------------------------------------

def file_kind(path: Path, file_type: str) -> str:
    """How a pt input is read: text (a document per line), jsonl (an object per line) or json-array."""
    if file_type == "text":
        return "text"
    with path.open("rb") as handle:
        head = handle.read(4096).lstrip()
    return "json-array" if head.startswith(b"[") else "jsonl"


def line_starts(path: Path, size: int, every: int) -> list[int]:
    """Offsets, about `every` bytes apart, at which a line starts (the ranges' boundaries)."""
    bounds = [0]
    with path.open("rb") as handle:
        target = every
        while target < size:
            handle.seek(target - 1)
            pos = target - 1
            while piece := handle.read(1 << 16):
                hit = piece.find(b"\n")
                if hit >= 0:
                    pos += hit + 1
                    break
                pos += len(piece)
            if pos >= size:
                break
            bounds.append(pos)
            target = pos + every
    return [*bounds, size]


def plan_split(split: str, specs: list[Any], every: int = SPLIT_BYTES) -> tuple[list[ShardTask], list[str]]:
    """(tasks, empty files) for the files of `specs`, in order."""
    tasks: list[ShardTask] = []
    empty: list[str] = []
    for spec in specs:
        column = spec.columns.get("prompt", "text")
        for path in spec.files:
            stat = path.resolve().stat()
            if stat.st_size == 0:
                empty.append(str(path))
                continue
            kind = file_kind(path, spec.file_type)
            bounds = [0, stat.st_size] if kind == "json-array" else line_starts(path, stat.st_size, every)
            for start, end in zip(bounds, bounds[1:]):
                tasks.append(ShardTask(split, len(tasks), str(path.resolve()), kind, column, start, end,
                                       stat.st_size, stat.st_mtime_ns))
    return tasks, empty


def file_stats(paths: Iterable[Path]) -> list[list[Any]]:
    """[path, size, mtime_ns] of each path, what a re-run compares before reading anything; a missing one is
    [path, None, None], so that its later arrival counts as a change."""
    out = []
    for path in paths:
        try:
            st = path.stat()
            out.append([str(path), st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([str(path), None, None])
    return out


def input_stats(specs_by_split: dict[str, list[Any]]) -> dict[str, list[list[Any]]]:
    """Every input's [path, size, mtime_ns] (`file_stats`), per split."""
    return {split: file_stats(p.resolve() for spec in specs for p in spec.files)
            for split, specs in specs_by_split.items()}


# --- reading documents ------------------------------------------------------------------------------------

def _utf8_error(task: ShardTask, offset: int) -> LmforgeError:
    from lmforge.data.loader import check_utf8  # names the line too; it reads up to the bad byte

    try:
        check_utf8(Path(task.source))
    except LmforgeError as err:
        return err
    return LmforgeError(f"{task.source}: not valid UTF-8 (byte {offset}); re-save the file as UTF-8")


def _lines(task: ShardTask, raw: bytes, offset: int) -> list[str]:
    """Lines of `raw` (starting at byte `offset`), universal newlines as the `datasets` text reader reads them."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _utf8_error(task, offset + err.start) from None
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def _text_of(task: ShardTask, record: Any, where: Callable[[], str]) -> str:
    if not isinstance(record, dict):
        raise LmforgeError(f"{task.source}: {where()}: expected a JSON object, got {type(record).__name__}")
    value = record.get(task.column)
    if value is not None and not isinstance(value, str):
        raise LmforgeError(f"{task.source}: {where()}: '{task.column}' must be a string")
    return value or ""


def _json_texts(task: ShardTask, lines: list[str], offset: int) -> tuple[list[str], int]:
    """(texts, rows without the text field) of JSON lines starting at byte `offset`."""
    def where(i: int) -> Callable[[], str]:
        return lambda: f"byte {offset + sum(len(s.encode()) + 1 for s in lines[:i])}"

    texts, missing = [], 0
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise LmforgeError(f"{task.source}: {where(i)()}: malformed JSON line ({err.msg})") from None
        missing += isinstance(record, dict) and task.column not in record
        texts.append(_text_of(task, record, where(i)))
    return texts, missing


def _array_texts(task: ShardTask) -> Iterator[tuple[list[str], int, int]]:
    """A JSON array file, read whole (it cannot be split at line starts)."""
    raw = Path(task.source).read_bytes()
    try:
        rows = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise _utf8_error(task, err.start) from None
    except json.JSONDecodeError as err:
        raise LmforgeError(f"{task.source}:{err.lineno}: malformed JSON ({err.msg})") from None
    if not isinstance(rows, list):
        raise LmforgeError(f"{task.source}: expected a JSON array of objects or one object per line")
    texts = [_text_of(task, r, lambda i=i: f"item {i + 1}") for i, r in enumerate(rows)]
    missing = sum(isinstance(r, dict) and task.column not in r for r in rows)
    yield texts, len(raw), missing


def read_documents(task: ShardTask) -> Iterator[tuple[list[str], int, int]]:
    """(documents, input bytes, rows without the text field) of a task, about BATCH_BYTES of input at a time."""
    if task.kind == "json-array":
        yield from _array_texts(task)
        return
    with open(task.source, "rb") as handle:
        handle.seek(task.start)
        pos, carry = task.start, b""
        while pos < task.end:
            chunk = handle.read(min(BATCH_BYTES, task.end - pos))
            if not chunk:
                break  # the file shrank while being read
            pos += len(chunk)
            data = carry + chunk
            cut = data.rfind(b"\n") + 1 if pos < task.end else len(data)
            carry = data[cut:]
            if cut:
                lines = _lines(task, data[:cut], pos - len(data))
                texts, missing = _json_texts(task, lines, pos - len(data)) if task.kind == "jsonl" else (lines, 0)
                yield texts, cut, missing
