"""Resolve `dataset: a,b` to files: LLaMA-Factory's `dataset_info.json` schema, or plain paths."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError

FILE_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text", ".text": "text"}
FORMATTINGS = ("alpaca", "sharegpt", "openai", "text")
# LLaMA-Factory's defaults for the `columns` and `tags` mappings.
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": None, "system": None}
SHAREGPT_COLUMNS = {"messages": "conversations", "system": None}
SHAREGPT_TAGS = {
    "role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
    "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system",
}
OPENAI_TAGS = {
    "role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
    "observation_tag": "tool", "function_tag": "function_call", "system_tag": "system",
}
HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
# Datasets shipped inside lmforge; a dataset_info.json entry of the same name takes precedence.
BUILTIN_DIR = Path(__file__).parent
BUILTIN = {
    "identity": {"file_name": "identity.json", "formatting": "alpaca", "placeholders": True},
}


@dataclass
class DatasetSpec:
    """One dataset: where its files are and how its rows map to conversations or text."""

    name: str
    files: list[Path]
    file_type: str
    formatting: str | None = None  # None: detected from the columns
    ranking: bool = False
    columns: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    num_samples: int | None = None
    placeholders: bool = False  # fill {{name}} / {{author}} from identity_name / identity_author
    origin: str = ""  # where the spec came from, for error messages

    def column(self, key: str) -> Any:
        defaults = ALPACA_COLUMNS if self.formatting == "alpaca" else SHAREGPT_COLUMNS
        return self.columns.get(key, defaults.get(key))

    def tag(self, key: str) -> str:
        defaults = OPENAI_TAGS if self.formatting == "openai" else SHAREGPT_TAGS
        return self.tags.get(key, defaults[key])


def resolve_datasets(names: list[str] | str | None, dataset_dir: str) -> list[DatasetSpec]:
    """`[a, b, path/to/file.jsonl]` (or `a,b,...`) -> specs, catalogue names first, then paths."""
    parts = names.split(",") if isinstance(names, str) else names or []
    if not parts:
        return []
    info_path = Path(dataset_dir) / "dataset_info.json"
    info = read_dataset_info(info_path) if info_path.is_file() else {}
    return [_resolve_one(n.strip(), info, info_path, Path(dataset_dir)) for n in parts if n.strip()]


def read_dataset_info(path: Path) -> dict[str, Any]:
    """Read a dataset_info.json catalogue, naming file and line when it is not valid JSON."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise LmforgeError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    if not isinstance(info, dict):
        raise LmforgeError(f"{path}: expected an object mapping dataset names to their description")
    return info


def _resolve_one(name: str, info: dict[str, Any], info_path: Path, dataset_dir: Path) -> DatasetSpec:
    if name in info:
        return _spec_from_info(name, info[name], info_path, dataset_dir)
    if name in BUILTIN:
        return _spec_from_info(name, BUILTIN[name], Path("lmforge built-in datasets"), BUILTIN_DIR)
    for candidate in (Path(name), dataset_dir / name):
        if candidate.exists():
            files, file_type = _files_of(candidate, name)
            return DatasetSpec(name=name, files=files, file_type=file_type, origin=str(candidate))
    known = ", ".join(sorted(info)) or "none"
    raise LmforgeError(
        f"dataset '{name}' is neither in {info_path} (known: {known}) nor a file or folder: "
        f"fix `dataset` or add '{name}' to dataset_info.json"
    )


def _spec_from_info(name: str, entry: Any, info_path: Path, dataset_dir: Path) -> DatasetSpec:
    where = f"{info_path} entry '{name}'"
    if not isinstance(entry, dict):
        raise LmforgeError(f"{where}: expected an object with file_name, formatting, columns")
    hub = [k for k in HUB_KEYS if k in entry]
    if hub and "file_name" not in entry:
        raise LmforgeError(
            f"{where} names a hub dataset ({hub[0]}); lmforge reads local files only: download it and set file_name"
        )
    if "file_name" not in entry:
        raise LmforgeError(f"{where}: missing file_name (the file or folder inside {dataset_dir})")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in FORMATTINGS:
        raise LmforgeError(f"{where}: formatting must be one of {', '.join(FORMATTINGS)}, got {formatting!r}")
    for key in ("columns", "tags"):
        if not isinstance(entry.get(key, {}), dict):
            raise LmforgeError(f"{where}: {key} must be an object")
    path = dataset_dir / entry["file_name"]
    if not path.exists():
        raise LmforgeError(f"{where}: file not found: {path}")
    files, file_type = _files_of(path, name)
    return DatasetSpec(
        name=name, files=files, file_type=file_type, formatting=formatting,
        ranking=bool(entry.get("ranking", False)), columns=dict(entry.get("columns", {})),
        tags=dict(entry.get("tags", {})), num_samples=entry.get("num_samples"),
        placeholders=bool(entry.get("placeholders", False)), origin=where,
    )


def _files_of(path: Path, name: str) -> tuple[list[Path], str]:
    """A file, or every data file in a folder (all of one type)."""
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")) if path.is_dir() else [path]
    types = {FILE_TYPES.get(p.suffix.lower()) for p in files}
    if not files:
        raise LmforgeError(f"dataset '{name}': folder {path} holds no data files")
    if None in types:
        bad = next(p for p in files if FILE_TYPES.get(p.suffix.lower()) is None)
        raise LmforgeError(
            f"dataset '{name}': unsupported file type {bad.name}; use one of {', '.join(sorted(FILE_TYPES))}"
        )
    if len(types) > 1:
        raise LmforgeError(f"dataset '{name}': folder {path} mixes file types {sorted(types)}; keep one type per folder")
    return files, types.pop()
