"""Stage pt at corpus scale: the token stream in flat binary shards, each with a small JSON index.

Why this format (nanoGPT's and Megatron's): pt data is a single column of token ids. A flat file of uint16
(uint32 for vocabularies over 65,536) ids carries no per-row offsets or schema, is opened with `numpy.memmap`
without reading it, and any block is a slice found in O(1) from the shards' token counts. Blocks of cutoff_len
are cut when they are read, so startup reads the manifest only, and cutoff_len can change without tokenizing
again.

Layout of tokenized_path:

    shards.json          the manifest, written last: the splits' shards (tokens, bytes, hash), the inputs'
                         size and mtime, the tokenizer and the totals; without it the folder is unfinished
    train/00000.bin      token ids of documents as BOS text EOS, concatenated in input order
    train/00000.json     its index: documents, tokens, bytes, hash, dtype, tokenizer and its fingerprint,
                         source file, byte range, the source's size and mtime
    validation/...       the same for eval_dataset

Writing: each input file is cut at line starts into tasks of about SPLIT_BYTES (a JSON array file is one task;
shard_input.py plans them and reads their documents); a process pool of preprocessing_num_workers turns each
task into one shard, tokenizing BATCH_BYTES of text at a time (through tiktoken where fast_bpe.py allows) and
appending to its file, so memory does not grow with the corpus. A shard is written under a hidden
`.NNNNN.bin.tmp` name and renamed when whole, its index after it: a killed run keeps its finished shards and the
next run redoes only the rest, and a run that finds the manifest matching the inputs' size and mtime returns
without reading them.
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import hashlib
import json
import logging
import multiprocessing as mp
import os
import queue
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from itertools import chain
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lmforge.data.fast_bpe import fast_bpe
from lmforge.data.shard_input import SPLIT_BYTES, ShardTask, input_stats, plan_split, read_documents
from lmforge.errors import LmforgeError

logger = logging.getLogger(__name__)
FORMAT, VERSION = "lmforge-token-shards", 1
MANIFEST = "shards.json"
SPLITS = ("train", "validation")
SHARD_FILE = re.compile(r"^\d{5}\.(bin|json)$")
Progress = Callable[[int, int], None]  # (input bytes, tokens) done since the last call


@dataclass(frozen=True)
class ShardJob:
    """What every worker needs besides its task: the tokenizer and how ids are stored."""

    tokenizer: Any
    dtype: str
    fingerprint: str
    tokenizer_name: str
    encoder: Any = None  # fast_bpe.FastBPE standing in for the tokenizer (the same ids), or None

    @property
    def encoder_name(self) -> str:
        return "tiktoken" if self.encoder is not None else "tokenizers"

    @property
    def bos(self) -> list[int]:
        return [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []

    @property
    def eos(self) -> list[int]:
        return [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []


@dataclass
class ShardReport:
    """What a preprocess did: shards written and reused, documents, tokens, empty files, throughput."""

    written: int = 0
    reused: int = 0
    documents: int = 0
    tokens: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    dtype: str = ""
    empty_files: list[str] = field(default_factory=list)
    tokens_written: int = 0  # by this run (tokens counts every shard)
    encoder: str = ""  # what ran the tokenizer's BPE: tiktoken or tokenizers

    def describe(self) -> str:
        rate = (f", {self.bytes_read / 1e6:.1f} MB tokenized in {self.seconds:.1f} s "
                f"({self.bytes_read / 1e6 / max(self.seconds, 1e-9):.2f} MB/s, "
                f"{self.tokens_written / max(self.seconds, 1e-9):,.0f} tokens/s, BPE by {self.encoder})"
                if self.written else "")
        empty = f", {len(self.empty_files)} empty files skipped" if self.empty_files else ""
        return (f"{self.written + self.reused} token shards ({self.written} written, {self.reused} already "
                f"complete), {self.documents} documents, {self.tokens} tokens ({self.dtype}){empty}{rate}")


def token_dtype(tokenizer: Any) -> str:
    """uint16 when every id fits (vocabularies up to 65,536), else uint32."""
    size = len(tokenizer)
    if size > 2**32:
        raise LmforgeError(f"the tokenizer has {size} ids; token shards hold at most 2**32")
    return "uint16" if size <= 2**16 else "uint32"


def make_job(tokenizer: Any) -> ShardJob:
    """The job description of `tokenizer` (its fingerprint is the Arrow cache's: `pipeline.tokenizer_fingerprint`)."""
    from lmforge.data.pipeline import tokenizer_fingerprint

    name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    return ShardJob(tokenizer, token_dtype(tokenizer), tokenizer_fingerprint(tokenizer), name)


# --- writing one shard ------------------------------------------------------------------------------------

def encode_documents(texts: list[str], job: ShardJob) -> np.ndarray:
    """BOS text EOS for every non-empty text, concatenated (as `processors.encode_pt_batch` builds the stream)."""
    texts = [t for t in texts if t]
    if not texts:
        return np.empty(0, dtype=job.dtype)
    bos, eos = job.bos, job.eos
    if job.encoder is not None:  # arrays from tiktoken: joined in numpy
        bos_ids, eos_ids = np.asarray(bos, dtype=np.int64), np.asarray(eos, dtype=np.int64)
        parts = [part for ids in job.encoder.encode_arrays(texts) for part in (bos_ids, ids, eos_ids)]
        return np.concatenate(parts).astype(job.dtype)
    encoded = job.tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    total = sum(map(len, encoded)) + len(encoded) * (len(bos) + len(eos))
    return np.fromiter(chain.from_iterable(x for ids in encoded for x in (bos, ids, eos)), job.dtype, total)


def _write(handle: Any, data: bytes) -> None:
    """Append to a shard (one place, so a test can make the disk fill up)."""
    handle.write(data)


def write_shard(task: ShardTask, folder: Path, job: ShardJob, progress: Progress) -> dict[str, Any]:
    """Tokenize one task into folder/NNNNN.bin (written as .NNNNN.bin.tmp, renamed when whole), then its index."""
    final, tmp = folder / f"{task.name}.bin", folder / f".{task.name}.bin.tmp"
    digest = hashlib.blake2b(digest_size=16)
    documents = tokens = missing = rows_seen = 0
    try:
        with open(tmp, "wb") as out:
            for texts, nbytes, lacking in read_documents(task):
                ids = encode_documents(texts, job)
                data = ids.tobytes()
                _write(out, data)
                digest.update(data)
                documents += sum(1 for t in texts if t)
                rows_seen += len(texts)
                missing += lacking
                tokens += len(ids)
                progress(nbytes, len(ids))
        if rows_seen and missing == rows_seen:
            raise LmforgeError(f"{task.source}: no row has a '{task.column}' field: map the text column with "
                               "columns.prompt in dataset_info.json")
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    index = {"format": FORMAT, "version": VERSION, "documents": documents, "tokens": tokens,
             "bytes": tokens * np.dtype(job.dtype).itemsize, "blake2b": digest.hexdigest(), "dtype": job.dtype,
             "tokenizer": job.tokenizer_name, "tokenizer_fingerprint": job.fingerprint, "encoder": job.encoder_name,
             "bos_token_id": job.tokenizer.bos_token_id, "eos_token_id": job.tokenizer.eos_token_id,
             "rows_without_text": missing, **asdict(task)}
    write_json(folder / f"{task.name}.json", index)
    return index


def write_json(path: Path, value: Any) -> None:
    """Write under a temporary name, then rename: a reader sees the whole file or none."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def finished_index(task: ShardTask, folder: Path, job: ShardJob) -> dict[str, Any] | None:
    """The index of a complete shard of exactly this task and tokenizer, else None (to be written)."""
    try:
        index = json.loads((folder / f"{task.name}.json").read_text())
        whole = (folder / f"{task.name}.bin").stat().st_size == index["bytes"]
    except (OSError, ValueError, KeyError):
        return None
    same = all(index.get(k) == v for k, v in asdict(task).items()) and index.get("dtype") == job.dtype
    return index if whole and same and index.get("tokenizer_fingerprint") == job.fingerprint else None


# --- the pool ---------------------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(job: ShardJob, progress: Any) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism
    _WORKER.update(job=job, queue=progress)


def _run_task(task: ShardTask, folder: str) -> dict[str, Any]:
    out = _WORKER["queue"]
    return write_shard(task, Path(folder), _WORKER["job"], lambda nbytes, tokens: out.put((nbytes, tokens)))


class _Meter:
    """The progress bar: input MB/s from tqdm, tokens/s beside it; totals kept for the disk-full estimate."""

    def __init__(self, total: int, disable: bool = False):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="Tokenizing to shards", disable=disable)
        self.bytes = self.tokens = 0
        self.start = self.shown = time.perf_counter()

    def __call__(self, nbytes: int, tokens: int) -> None:
        self.bytes += nbytes
        self.tokens += tokens
        self.bar.update(nbytes)
        now = time.perf_counter()
        if now - self.shown > 0.5:
            self.bar.set_postfix_str(f"{self.tokens / (now - self.start):,.0f} tokens/s", refresh=False)
            self.shown = now


def _run_pool(tasks: list[ShardTask], folders: dict[str, Path], job: ShardJob, workers: int, meter: _Meter,
              done: dict[ShardTask, dict[str, Any]]) -> None:
    """Write `tasks` on `workers` processes; on the first failure the queued ones are cancelled, the running ones
    finish (their shards are kept), and the failure is raised."""
    context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    progress = context.Queue()

    def drain() -> None:
        while True:
            try:
                meter(*progress.get_nowait())
            except queue.Empty:
                return

    with cf.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                initargs=(job, progress)) as pool:
        pending = {pool.submit(_run_task, t, str(folders[t.split])): t for t in tasks}
        failure = None
        while pending:
            finished, _ = cf.wait(pending, timeout=0.2, return_when=cf.FIRST_COMPLETED)
            drain()
            for future in finished:
                task = pending.pop(future)
                if future.cancelled():
                    continue
                if future.exception() is None:
                    done[task] = future.result()
                elif failure is None:
                    failure = future.exception()
                    for other in pending:
                        other.cancel()
        drain()
    if failure is not None:
        raise failure


def _run(tasks: list[ShardTask], folders: dict[str, Path], job: ShardJob, workers: int | None,
         meter: _Meter) -> dict[ShardTask, dict[str, Any]]:
    """Write every task, in this process or on a pool; disk full becomes one line with the space still needed."""
    done: dict[ShardTask, dict[str, Any]] = {}
    try:
        if workers and workers > 1 and len(tasks) > 1:
            _run_pool(tasks, folders, job, min(workers, len(tasks)), meter, done)
        else:
            for task in tasks:
                done[task] = write_shard(task, folders[task.split], job, meter)
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise _disk_full(tasks, done, folders, meter, job) from None
    return done


def _disk_full(tasks: list[ShardTask], done: dict[ShardTask, Any], folders: dict[str, Path], meter: _Meter,
               job: ShardJob) -> LmforgeError:
    left = [t for t in tasks if t not in done]
    ratio = meter.tokens * np.dtype(job.dtype).itemsize / meter.bytes if meter.tokens else 0.5  # ~2 bytes/4 chars
    needed = ratio * sum(t.end - t.start for t in left)
    folder = folders[left[0].split] if left else next(iter(folders.values()))
    free = shutil.disk_usage(folder).free
    return LmforgeError(f"disk full writing token shards to {folder.parent}: about {needed / 1e6:,.0f} MB more are "
                        f"needed for the {len(left)} unfinished shards ({free / 1e6:,.0f} MB free); the "
                        f"{len(done)} shards finished are kept: free space and run the same command again")


# --- the manifest and the whole run -----------------------------------------------------------------------

def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest of a finished shard folder, or None."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def is_shard_folder(path: Path) -> bool:
    """Whether `path` holds token shards, finished or not (then preprocess may write there again)."""
    if (path / MANIFEST).is_file():
        return True
    if not (path / "train").is_dir():
        return False
    splits = [p for p in path.iterdir() if not p.name.endswith(".tmp")]
    return all(p.name in SPLITS and p.is_dir() for p in splits) and all(
        SHARD_FILE.match(f.name) or f.name.endswith(".tmp") for p in splits for f in p.iterdir())


def refuse_other_tokenizer(recorded: dict[str, Any], job: ShardJob, path: Path) -> None:
    """Shards of another tokenizer are never mixed with, or read as, this one's."""
    if recorded.get("tokenizer_fingerprint") != job.fingerprint:
        raise LmforgeError(
            f"{path} holds token shards of tokenizer {recorded.get('tokenizer')} (fingerprint "
            f"{str(recorded.get('tokenizer_fingerprint'))[:12]}), not of this run's {job.tokenizer_name} (fingerprint "
            f"{job.fingerprint[:12]}): use another tokenized_path, or set overwrite_cache: true to write them again")


def _up_to_date(path: Path, job: ShardJob, stats: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest when it matches the inputs' size and mtime and every shard is whole: nothing to do."""
    manifest = read_manifest(path)
    if manifest is None:
        return None
    refuse_other_tokenizer(manifest, job, path)
    if manifest.get("inputs") != stats or manifest.get("dtype") != job.dtype:
        return None
    return manifest if shards_whole(path, manifest) else None


def shards_whole(path: Path, manifest: dict[str, Any]) -> bool:
    """Whether every shard the manifest lists is on disk at its recorded size."""
    for split, shards in manifest["splits"].items():
        for shard in shards:
            bin_file = path / split / shard["file"]
            if not bin_file.is_file() or bin_file.stat().st_size != shard["bytes"]:
                return False
    return True


def _previous_tokenizer(folders: dict[str, Path], job: ShardJob, path: Path) -> None:
    for folder in folders.values():
        for index_file in sorted(folder.glob("[0-9]*.json"))[:1]:
            try:
                refuse_other_tokenizer(json.loads(index_file.read_text()), job, path)
            except ValueError:
                continue


def _tidy(folder: Path, keep: set[str]) -> None:
    """Remove leftovers: temporary files of a killed run, shards no longer planned."""
    for f in folder.iterdir():
        if f.name.endswith(".tmp") or (SHARD_FILE.match(f.name) and f.name.split(".")[0] not in keep):
            f.unlink(missing_ok=True)


def write_shards(specs_by_split: dict[str, list[Any]], path: Path, tokenizer: Any, workers: int | None = None,
                 overwrite: bool = False, every: int = SPLIT_BYTES, progress_bar: bool = True) -> ShardReport:
    """Tokenize the pt datasets of each split ("train", "validation") into token shards under `path`; finished
    shards of the same inputs and tokenizer are kept, and a complete folder is left as it is."""
    start = time.perf_counter()
    job = make_job(tokenizer)
    stats = input_stats(specs_by_split)
    manifest = None if overwrite else _up_to_date(path, job, stats)
    if manifest is not None:
        totals = manifest["totals"]
        return ShardReport(reused=totals["shards"], documents=totals["documents"], tokens=totals["tokens"],
                           dtype=job.dtype, empty_files=manifest["empty_files"], seconds=time.perf_counter() - start)
    folders = {split: path / split for split in specs_by_split}
    plans = {split: plan_split(split, specs, every) for split, specs in specs_by_split.items()}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    if not overwrite:
        _previous_tokenizer(folders, job, path)
    for split in set(SPLITS) - set(folders):
        shutil.rmtree(path / split, ignore_errors=True)  # eval_dataset was dropped since the last run
    (path / MANIFEST).unlink(missing_ok=True)  # the folder is unfinished until the new manifest is written
    for split, (tasks, _) in plans.items():
        _tidy(folders[split], {t.name for t in tasks})
    tasks = [t for tasks, _ in plans.values() for t in tasks]
    reused = {t: i for t in tasks if not overwrite and (i := finished_index(t, folders[t.split], job)) is not None}
    todo = [t for t in tasks if t not in reused]
    if todo:
        job = replace(job, encoder=fast_bpe(tokenizer, _sample(todo)))
    meter = _Meter(sum(t.end - t.start for t in todo), disable=not progress_bar or not todo)
    try:
        written = _run(todo, folders, job, workers, meter)
    finally:
        meter.bar.close()
    indexes = reused | written
    report = ShardReport(written=len(written), reused=len(reused), dtype=job.dtype, bytes_read=meter.bytes,
                         encoder=job.encoder_name,
                         tokens_written=meter.tokens, empty_files=[e for _, empty in plans.values() for e in empty])
    report.documents = sum(i["documents"] for i in indexes.values())
    report.tokens = sum(i["tokens"] for i in indexes.values())
    if not report.tokens:
        raise LmforgeError(f"no text to tokenize in {', '.join(str(s.files[0]) for s in specs_by_split['train'])}"
                           f"{' (every file is empty)' if report.empty_files else ''}")
    _write_manifest(path, job, stats, plans, indexes, report)
    report.seconds = time.perf_counter() - start
    return report


def _sample(tasks: list[ShardTask]) -> list[str]:
    """The first batch of documents of the first line-cut task: what fast_bpe checks before the run (a JSON
    array file is read whole, so it is left to its worker)."""
    task = next((t for t in tasks if t.kind != "json-array"), None)
    return next(read_documents(task), ([],))[0] if task is not None else []


def _write_manifest(path: Path, job: ShardJob, stats: dict[str, Any], plans: dict[str, Any],
                    indexes: dict[ShardTask, dict[str, Any]], report: ShardReport) -> None:
    splits = {split: [{"file": f"{t.name}.bin", "tokens": indexes[t]["tokens"], "bytes": indexes[t]["bytes"],
                       "documents": indexes[t]["documents"], "blake2b": indexes[t]["blake2b"]} for t in tasks]
              for split, (tasks, _) in plans.items()}
    manifest = {"format": FORMAT, "version": VERSION, "dtype": job.dtype, "tokenizer": job.tokenizer_name,
                "tokenizer_fingerprint": job.fingerprint, "bos_token_id": job.tokenizer.bos_token_id,
                "eos_token_id": job.tokenizer.eos_token_id, "inputs": stats, "empty_files": report.empty_files,
                "totals": {"shards": len(indexes), "documents": report.documents, "tokens": report.tokens},
                "splits": splits}
    write_json(path / MANIFEST, manifest)
