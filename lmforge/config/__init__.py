"""Typed configuration: one dataclass per concern, parsed from YAML plus command-line overrides."""

from lmforge.config.args import (
    DataArguments,
    ExportArguments,
    FinetuningArguments,
    GenerationArguments,
    ModelArguments,
    RLArguments,
    TrainingArguments,
)
from lmforge.config.parser import TrainConfig, parse_train_config

__all__ = [
    "DataArguments",
    "ExportArguments",
    "GenerationArguments",
    "FinetuningArguments",
    "ModelArguments",
    "RLArguments",
    "TrainingArguments",
    "TrainConfig",
    "parse_train_config",
]
