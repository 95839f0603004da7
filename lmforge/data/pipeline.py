"""`get_datasets`: files -> tokenized train/eval datasets, cached by a key over data, options and
tokenizer, so a second run with the same inputs does not tokenize again. Stage pt with tokenized_path writes
and reads token shards instead (lmforge/data/shards.py)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import datasets
import pyarrow.compute as pc

from lmforge import __version__
from lmforge.cache import cache_root, file_digests
from lmforge.config import DataArguments
from lmforge.data import shard_reader, shards
from lmforge.data.catalogue import DatasetSpec, resolve_datasets
from lmforge.data.formats import map_rows
from lmforge.data.loader import load_raw
from lmforge.data.packing import pack_dataset
from lmforge.data.processors import Status
from lmforge.errors import LmforgeError
from lmforge.stages import get_stage

logger = logging.getLogger(__name__)
PROCESSING_VERSION = 3  # bump when tokenization output changes, to invalidate caches
STAT_COLUMNS = ("_status", "_loss_tokens")


@dataclass
class DataSummary:
    """What the data became: rows read, examples kept, truncated and dropped, tokens, loss share."""
    rows: int = 0
    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    eval_examples: int = 0
    source: str = "tokenized"
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        share = self.loss_tokens / self.tokens if self.tokens else 0.0
        packed = (f", packed into {self.extra['packed_rows']} rows at {self.extra['packing_efficiency']:.1%} "
                  "efficiency" if "packing_efficiency" in self.extra else "")
        invalid = f", {self.extra['invalid_rows']} invalid rows skipped" if self.extra.get("invalid_rows") else ""
        return (f"{self.examples} train examples ({self.rows} rows read{invalid}, {self.truncated} truncated, "
                f"{self.dropped} dropped by cutoff_len), {self.eval_examples} eval examples, "
                f"{self.tokens} tokens, {share:.1%} carry loss{packed} [{self.source}]")


@dataclass
class PreparedData:
    """Tokenized train and eval splits with their summary."""
    train: Any
    eval: Any | None
    summary: DataSummary


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the vocabulary, chat template and special tokens: the cache's tokenizer part."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(tokenizer.get_vocab()).encode())
    for part in (tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token):
        h.update(repr(part).encode())
    return h.hexdigest()


def cache_key(args: DataArguments, stage: str, seed: int, specs: list[DatasetSpec], tokenizer: Any) -> str:
    """The cache folder name: a hash over the data files, the options that change tokenization, and the tokenizer."""
    digests = file_digests([p for s in specs for p in s.files])
    keyed = {
        "version": [__version__, PROCESSING_VERSION],
        "stage": stage, "seed": seed,
        "options": {k: getattr(args, k) for k in ("template", "cutoff_len", "max_samples", "val_size",
                                                  "mix_strategy", "interleave_probs", "train_on_prompt",
                                                  "mask_history", "dataset", "eval_dataset",
                                                  "identity_name", "identity_author", "packing",
                                                  "skip_invalid_examples")},
        "files": [[s.name, s.formatting, s.columns, s.tags, s.num_samples, s.ranking, s.placeholders,
                   [[str(p.resolve()), digests[str(p.resolve())]] for p in s.files]] for s in specs],
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    return hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:24]


@dataclass
class LoadReport:
    """Rows read per dataset and the invalid rows skipped (file:line: reason)."""
    rows: dict[str, int] = field(default_factory=dict)  # rows read per dataset
    invalid: list[str] = field(default_factory=list)  # "file:line: reason" of skipped rows


def _drop_invalid(ds: Any, report: LoadReport) -> Any:
    if "_invalid" not in ds.column_names:
        return ds
    if isinstance(ds, datasets.IterableDataset):
        return ds.filter(lambda r: not r, input_columns="_invalid").remove_columns("_invalid")
    reasons = [r for r in ds["_invalid"] if r]
    if reasons:
        report.invalid += reasons
        ds = ds.filter(lambda r: not r, input_columns="_invalid", desc="Dropping invalid rows")
    return ds.remove_columns("_invalid")


def load_conversations(names: list[str] | None, args: DataArguments, stage: str, seed: int, num_proc: int | None,
                       report: LoadReport) -> Any:
    """Every dataset in `names` read, converted, limited to max_samples and mixed (None: no names)."""
    specs = resolve_datasets(names, args.dataset_dir)
    if not specs:
        return None
    parts = []
    convert = get_stage(stage).load("rows")
    placeholders = {"name": args.identity_name, "author": args.identity_author}
    for spec in specs:
        ds = load_raw(spec, streaming=args.streaming)
        limits = [x for x in (args.max_samples, spec.num_samples) if x]
        if limits:
            ds = ds.take(min(limits)) if args.streaming else ds.select(range(min(min(limits), len(ds))))
        if not args.streaming:
            report.rows[spec.name] = len(ds)
        converted = convert(ds, spec, num_proc, placeholders, args.skip_invalid_examples)
        parts.append(_drop_invalid(converted, report))
    if len(parts) == 1:
        return parts[0]
    if args.mix_strategy == "concat":
        return datasets.concatenate_datasets(parts)
    strategy = "first_exhausted" if args.mix_strategy == "interleave_under" else "all_exhausted"
    return datasets.interleave_datasets(parts, probabilities=_interleave_probabilities(args, len(parts)),
                                        seed=seed, stopping_strategy=strategy)


def _interleave_probabilities(args: DataArguments, n_datasets: int) -> list[float] | None:
    """interleave_probs scaled to sum to 1 (datasets requires it), one per dataset; None samples evenly."""
    weights = args.interleave_probs
    if weights is None:
        return None
    if len(weights) != n_datasets:
        raise LmforgeError(f"interleave_probs has {len(weights)} values but {n_datasets} datasets are mixed")
    if args.mix_strategy == "interleave_over" and 0 in weights:
        raise LmforgeError("interleave_over samples until every dataset is exhausted, which a dataset of "
                           "probability 0 never is: give it a probability > 0 or use interleave_under")
    return [w / sum(weights) for w in weights]


def _split(ds: datasets.Dataset, val_size: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    if not val_size:
        return ds, None
    n_eval = int(val_size) if val_size >= 1 else int(val_size * len(ds))
    if not 1 <= n_eval < len(ds):
        raise LmforgeError(f"val_size {val_size} leaves no train or no eval rows out of {len(ds)}: change val_size")
    split = ds.train_test_split(test_size=n_eval, seed=seed)
    return split["train"], split["test"]


def _tokenize(ds: Any, tokenizer: Any, args: DataArguments, stage: str, num_proc: int | None) -> Any:
    entry = get_stage(stage)
    fn = entry.load("encoder")(args, tokenizer)
    columns = [] if entry.keeps_columns else ds.column_names  # prompt rows keep their columns for the rewards
    return map_rows(ds, fn, batched=True, batch_size=1000, remove_columns=columns, num_proc=num_proc, desc="Tokenizing")


def _finish(ds: datasets.Dataset, summary: DataSummary | None, what: str) -> datasets.Dataset:
    """Count truncated/dropped rows and loss tokens, remove dropped rows and the stat columns."""
    if len(ds) == 0 or "_status" not in ds.column_names:
        raise LmforgeError(f"the {what} data gave no examples: for pt it must hold at least cutoff_len tokens; "
                           "lower cutoff_len or add data")
    status = ds["_status"]
    if summary is not None:
        summary.truncated = sum(1 for s in status if s == Status.TRUNCATED)
        summary.dropped = sum(1 for s in status if s == Status.DROPPED)
        summary.loss_tokens = sum(ds["_loss_tokens"])
    if any(s == Status.DROPPED for s in status):
        ds = ds.filter(lambda s: s != Status.DROPPED, input_columns="_status", desc="Dropping over-long rows")
    return ds.remove_columns(list(STAT_COLUMNS))


def build_datasets(args: DataArguments, stage: str, seed: int, tokenizer: Any) -> PreparedData:
    """Load, convert, mix, tokenize, then split off val_size examples (no caching)."""
    num_proc = args.preprocessing_num_workers
    report = LoadReport()
    raw = load_conversations(args.dataset, args, stage, seed, num_proc, report)
    if raw is None:
        raise LmforgeError("no dataset given: set `dataset` (names from dataset_info.json or file paths)")
    raw_eval = load_conversations(args.eval_dataset, args, stage, seed, num_proc, LoadReport())
    summary = DataSummary()
    if report.invalid:
        summary.extra["invalid_rows"] = len(report.invalid)
        summary.extra["invalid_examples"] = report.invalid[:10]
    if args.streaming:
        train = _tokenize(raw, tokenizer, args, stage, num_proc)
        train = train.remove_columns(list(STAT_COLUMNS)).filter(lambda ids: len(ids) > 0, input_columns="input_ids")
        summary.source = "streaming"
        return PreparedData(train, None, summary)
    summary.rows = sum(report.rows.values())
    summary.extra["rows_per_dataset"] = dict(report.rows)
    train = _finish(_tokenize(raw, tokenizer, args, stage, num_proc), summary, "training")
    if raw_eval is not None:
        evald = _finish(_tokenize(raw_eval, tokenizer, args, stage, num_proc), None, "eval")
    else:
        train, evald = _split(train, args.val_size, seed)  # pt: blocks, sft: conversations
    summary.examples = len(train)
    summary.tokens = count_tokens(train)
    summary.eval_examples = len(evald) if evald is not None else 0
    if args.packing:
        train, efficiency = pack_dataset(train, args.cutoff_len, seed)
        evald = pack_dataset(evald, args.cutoff_len, seed)[0] if evald is not None else None
        summary.extra["packing_efficiency"] = round(efficiency, 4)
        summary.extra["packed_rows"] = len(train)
    return PreparedData(train, evald, summary)


def count_tokens(ds: datasets.Dataset) -> int:
    """Tokens the model reads: input_ids; for pairs the prompt twice plus both answers; for kto prompt plus
    completion; for rl prompts the prompts."""
    table = ds.with_format("arrow")[:]
    if "prompt_length" in ds.column_names:
        return int(pc.sum(table["prompt_length"]).as_py() or 0)
    columns = [c for c in ("input_ids", "completion_ids") if c in ds.column_names]
    if columns:
        columns += ["prompt_ids"] if "completion_ids" in columns else []
        return int(sum(pc.sum(pc.list_value_length(table[c])).as_py() or 0 for c in columns))
    lengths = {k: pc.sum(pc.list_value_length(table[k])).as_py() or 0 for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
    return int(2 * lengths["prompt_ids"] + lengths["chosen_ids"] + lengths["rejected_ids"])


def token_lengths(ds: datasets.Dataset) -> Any:
    """Length of every row's input_ids, computed by pyarrow without building Python lists."""
    return pc.list_value_length(ds.with_format("arrow")[:]["input_ids"])


def with_length_column(ds: datasets.Dataset) -> datasets.Dataset:
    """A `length` column, so the group_by_length sampler need not scan the data."""
    if "length" in ds.column_names:
        return ds
    return ds.add_column("length", token_lengths(ds).to_pylist())


def tokenized_dir(path: Path) -> Path | None:
    """The folder of a saved DatasetDict under `path`: `path` itself (what `datasets.load_from_disk(path)` and
    LLaMA-Factory's tokenized_path read), or its `data` folder (lmforge before 0.2); None when neither."""
    for folder in (path, path / "data"):
        if (folder / "dataset_dict.json").is_file():
            return folder
    return None


def save_prepared(data: PreparedData, path: Path) -> None:
    """Write atomically (a temporary folder renamed into place) as a DatasetDict that
    `datasets.load_from_disk(path)` opens, with lmforge's summary.json beside its splits."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        splits = {"train": data.train} | ({"validation": data.eval} if data.eval is not None else {})
        with _quiet_datasets():
            datasets.DatasetDict(splits).save_to_disk(str(tmp))
        (tmp / "summary.json").write_text(json.dumps(data.summary.__dict__, indent=2))
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No progress bar for steps that take milliseconds (saving, loading the cache)."""
    was_enabled = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def load_prepared(path: Path, source: str) -> PreparedData:
    """Tokenized data saved by `save_prepared` or by LLaMA-Factory (memory-mapped), labelled with its source."""
    folder = tokenized_dir(path)
    if folder is None:
        raise LmforgeError(f"{path} is not a tokenized dataset (no dataset_dict.json): write it with "
                           "`lmforge preprocess` or datasets' save_to_disk")
    dd = datasets.load_from_disk(str(folder))
    if "train" not in dd:
        raise LmforgeError(f"{path}: the tokenized dataset has no train split (it has {', '.join(dd) or 'none'})")
    summary_file = path / "summary.json"
    summary = DataSummary(**json.loads(summary_file.read_text())) if summary_file.is_file() else DataSummary()
    summary.source = source
    return PreparedData(dd["train"], dd.get("validation"), summary)


def tokenized_files(path: Path) -> list[Path] | None:
    """The files that stand for the tokenized data at `path` in a run's fingerprint: a saved dataset's files, or
    the token shards' manifest (it holds every shard's hash and size); None when `path` holds neither."""
    if shards.read_manifest(path) is not None:
        return [path / shards.MANIFEST]
    folder = tokenized_dir(path)
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder is not None else None


def check_tokenized_path(path: Path) -> None:
    """Refuse a tokenized_path that holds something else: it is replaced whole when lmforge writes it."""
    if shards.is_shard_folder(path):
        return
    if tokenized_dir(path) is None and path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise LmforgeError(f"tokenized_path {path} exists and holds no tokenized dataset: choose a new folder "
                           "(nothing was written)")


def with_stage_columns(data: PreparedData, stage: str, path: str) -> PreparedData:
    """Loaded pt/sft data with the columns training reads: LLaMA-Factory writes pt blocks without labels (its
    collator copies the inputs), which for pt are the inputs; sft rows must carry their labels."""
    if stage not in ("pt", "sft") or "labels" in data.train.column_names:
        return data
    if stage == "sft" or "input_ids" not in data.train.column_names:
        raise LmforgeError(f"tokenized_path {path} has no labels column for stage {stage}: write it again with "
                           "`lmforge preprocess`")
    add = lambda ds: ds.map(lambda ids: {"labels": ids}, input_columns="input_ids")  # noqa: E731
    return PreparedData(add(data.train), add(data.eval) if data.eval is not None else None, data.summary)


def shard_specs(args: DataArguments, stage: str) -> dict[str, list[DatasetSpec]] | None:
    """The datasets of each split ("train", "validation") to write as token shards: stage pt with tokenized_path,
    unless an option needs the whole dataset in Arrow (packing, max_samples, interleaving, streaming) or a file is
    csv or parquet; then None, with the reason logged."""
    if stage != "pt" or not args.tokenized_path:
        return None
    specs = {"train": resolve_datasets(args.dataset, args.dataset_dir)}
    if not specs["train"]:
        raise LmforgeError("no dataset given: set `dataset` (names from dataset_info.json or file paths)")
    if args.eval_dataset:
        specs["validation"] = resolve_datasets(args.eval_dataset, args.dataset_dir)
    types = {s.file_type for split in specs.values() for s in split} - {"json", "text"}
    reasons = (("packing places whole documents", args.packing), ("streaming", args.streaming),
               ("max_samples", args.max_samples),
               (f"mix_strategy {args.mix_strategy}", args.mix_strategy != "concat" and len(specs["train"]) > 1),
               (f"{', '.join(sorted(types))} files", types))
    reason = next((why for why, applies in reasons if applies), None)
    if reason:
        logger.info("tokenized_path: an Arrow dataset, not token shards (%s)", reason)
        return None
    return specs


def write_token_shards(args: DataArguments, specs: dict[str, list[DatasetSpec]], tokenizer: Any) -> shards.ShardReport:
    """Bring the token shards in tokenized_path up to date with the datasets (see `shards.write_shards`)."""
    path = Path(args.tokenized_path)
    if tokenized_dir(path) is not None:
        shutil.rmtree(path)  # an Arrow dataset lmforge wrote there before: replaced whole, as save_prepared does
    report = shards.write_shards(specs, path, tokenizer, args.preprocessing_num_workers, args.overwrite_cache)
    logger.info("token shards in %s: %s", path, report.describe())
    return report


def shard_dependencies(model: Any, args: DataArguments) -> list[Path]:
    """Besides the inputs, the files token shards depend on: dataset_info.json (present or not) and the files the
    tokenizer is read from (see `shard_cache`)."""
    from lmforge.data.shard_cache import model_files
    from lmforge.model.loader import resolve_model_path

    name = model.tokenizer_name_or_path or model.model_name_or_path
    return [Path(args.dataset_dir) / "dataset_info.json", *model_files(resolve_model_path(name), name)]


def load_token_shards(args: DataArguments, stage: str, tokenizer: Any) -> PreparedData:
    """Blocks of cutoff_len from the token shards in tokenized_path (written first when unfinished)."""
    path = Path(args.tokenized_path)
    if stage != "pt":
        raise LmforgeError(f"tokenized_path {path} holds pt token shards; stage {stage} needs its own tokenized data: "
                           "choose another tokenized_path")
    if args.packing:
        raise LmforgeError("packing cannot read token shards (one stream cut into cutoff_len blocks, no document "
                           "boundaries): set packing: false, or preprocess with packing: true into another "
                           "tokenized_path (an Arrow dataset)")
    if shards.read_manifest(path) is None:
        specs = shard_specs(args, stage)
        if specs is not None:  # else open_blocks names the unfinished folder
            write_token_shards(args, specs, tokenizer)
    else:
        logger.info("loading token shards from %s; data options other than cutoff_len and val_size are ignored", path)
    train, evald, manifest = shard_reader.open_blocks(path, tokenizer, args.cutoff_len, args.val_size)
    if not len(train):
        raise LmforgeError(f"the token shards in {path} hold {manifest['totals']['tokens']} tokens, fewer than one "
                           f"block of cutoff_len {args.cutoff_len}: lower cutoff_len or add data")
    tokens = len(train) * args.cutoff_len
    summary = DataSummary(rows=manifest["totals"]["documents"], examples=len(train), tokens=tokens, loss_tokens=tokens,
                          eval_examples=len(evald) if evald is not None else 0, source=f"token shards in {path}")
    summary.extra |= {"shards": manifest["totals"]["shards"], "corpus_tokens": manifest["totals"]["tokens"]}
    return PreparedData(train, evald, summary)


def get_datasets(args: DataArguments, stage: str, seed: int, tokenizer: Any) -> PreparedData:
    """Tokenized data for training: from `tokenized_path`, from the cache, or built now."""
    if args.tokenized_path:
        path = Path(args.tokenized_path)
        check_tokenized_path(path)
        if shards.is_shard_folder(path) or tokenized_dir(path) is None and shard_specs(args, stage) is not None:
            return load_token_shards(args, stage, tokenizer)
    if args.tokenized_path and tokenized_dir(Path(args.tokenized_path)) is not None:
        logger.warning("loading tokenized data from %s; data options are ignored", args.tokenized_path)
        return with_stage_columns(load_prepared(Path(args.tokenized_path), source=f"loaded from {args.tokenized_path}"),
                                  stage, args.tokenized_path)
    if args.streaming:
        return build_datasets(args, stage, seed, tokenizer)
    specs = resolve_datasets(args.dataset, args.dataset_dir) + resolve_datasets(args.eval_dataset, args.dataset_dir)
    cached = cache_root() / "datasets" / cache_key(args, stage, seed, specs, tokenizer)
    data = None
    if cached.is_dir() and not args.overwrite_cache:
        try:
            data = load_prepared(cached, source=f"cache {cached}")
        except Exception as err:  # a damaged cache entry is rebuilt, never fatal
            logger.warning("ignoring unreadable cache %s (%s)", cached, err)
    if data is None:
        save_prepared(build_datasets(args, stage, seed, tokenizer), cached)
        data = load_prepared(cached, source="tokenized now")  # memory-mapped from the cache
    if args.tokenized_path:
        save_prepared(data, Path(args.tokenized_path))
    return data
