"""Typed configuration: one dataclass per concern, parsed from YAML plus command-line overrides.

The names below are loaded on first use (PEP 562): the dataclasses import transformers, torch and peft, and a
command that only reads its raw options (`lmforge.config.sources`) should not pay for that.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "DataArguments": "args", "ExportArguments": "args", "FinetuningArguments": "args", "GenerationArguments": "args",
    "ModelArguments": "args", "RLArguments": "args", "TrainingArguments": "args",
    "TrainConfig": "parser", "parse_train_config": "parser",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value
    return value
