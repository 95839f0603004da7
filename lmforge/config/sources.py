"""Where options come from: a YAML file, then `--key value` overrides, as one plain dict.

Kept apart from the typed dataclasses (which subclass transformers' TrainingArguments and so import torch and
peft, several seconds) so that a command can read its raw options first and decide whether it has work to do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import yaml

from lmforge.errors import LmforgeError

# LLaMA-Factory names that mean the same thing as one of ours.
ALIASES: dict[str, str] = {"neat_packing": "packing", "enable_liger_kernel": "use_liger_kernel"}
TRUE_WORDS = ("true", "1", "yes", "on")


def raw_flag(raw: Mapping[str, Any], key: str) -> bool:
    """Whether raw option `key` is on, read before the typed config exists (YAML true or a command-line word)."""
    return str(raw.get(key, "")).lower() in TRUE_WORDS


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config into a dict, naming file and line when it does not parse."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise LmforgeError(f"{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LmforgeError(f"{path}: the config must be a mapping of option: value, got {type(data).__name__}")
    return data


def split_cli(argv: list[str]) -> tuple[str | None, dict[str, Any]]:
    """`[CONFIG.yaml] --key value --flag --key=value` -> (config path, {key: raw string})."""
    config_path = None
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            if config_path is None and i == 0:
                config_path = arg
                i += 1
                continue
            raise LmforgeError(f"unexpected argument {arg!r}: options are written --key value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value = argv[i + 1]
                i += 1
            else:
                value = "true"
        overrides[key.replace("-", "_")] = value
        i += 1
    return config_path, overrides


def merge_sources(argv: list[str]) -> tuple[str | None, dict[str, Any]]:
    """YAML first, then command-line values override it."""
    config_path, overrides = split_cli(argv)
    raw = load_yaml(config_path) if config_path else {}
    raw.update(overrides)
    for old, new in ALIASES.items():
        if old in raw:
            value = raw.pop(old)
            # `packing: false` beside `neat_packing: true` (LLaMA-Factory style) means packing on
            if new not in raw or str(value).lower() == "true":
                raw[new] = value
    return config_path, raw
