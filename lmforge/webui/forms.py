"""The Train form: its fields, their defaults and help (read from the option dataclasses, the one place options
are documented), the choices the page offers, and the options, YAML and command line the form stands for."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import Any

import yaml

from lmforge.config.parser import GROUPS, all_option_names, coerce_option, field_default, field_types, init_fields
from lmforge.errors import LmforgeError

TRAIN_FIELDS = ("model_name_or_path", "stage", "finetuning_type", "dataset_dir", "dataset", "template",
                "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                "gradient_accumulation_steps", "cutoff_len", "lora_rank", "output_dir", "logging_steps", "save_steps")
DEFAULT_MODEL = "smollm2-135m-instruct"  # the embedded model, as `lmforge chat` uses when none is given


def option_default(name: str, groups: tuple[type, ...] = GROUPS) -> Any:
    """An option's default value, as its dataclass declares it."""
    return field_default(init_fields(all_option_names(groups)[name])[name])


def option_help(name: str, groups: tuple[type, ...] = GROUPS) -> str:
    """An option's one-line help, as `--help` shows it."""
    return " ".join(str(init_fields(all_option_names(groups)[name])[name].metadata.get("help", "")).split())


def coerce_value(name: str, value: Any, groups: tuple[type, ...] = GROUPS) -> Any:
    """A YAML or command-line value converted to the option's type (the CLI's error when it does not fit)."""
    return coerce_option(name, value, field_types(all_option_names(groups)[name])[name])


def model_choices() -> list[str]:
    """The model aliases that resolve offline; the page also takes a local directory typed in."""
    from lmforge.model.loader import load_aliases

    return list(load_aliases())


def dataset_choices(dataset_dir: str) -> list[str]:
    """The names in `dataset_dir`'s dataset_info.json, then lmforge's built-in datasets."""
    from lmforge.data.catalogue import BUILTIN, read_dataset_info

    path = Path(dataset_dir or ".") / "dataset_info.json"
    try:
        names = list(read_dataset_info(path)) if path.is_file() else []
    except LmforgeError:
        names = []
    return names + [name for name in BUILTIN if name not in names]


def template_choices() -> list[str]:
    """auto (the tokenizer's own chat template) and the catalogue's templates."""
    from lmforge.data.templates import template_names

    return list(dict.fromkeys(["auto", *template_names()]))


def stage_choices() -> list[tuple[str, str]]:
    """(label, stage) pairs: each stage with its one-line summary."""
    from lmforge.stages import STAGES

    return [(f"{name}: {stage.summary}", name) for name, stage in STAGES.items()]


def form_defaults(prefill: dict[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    """The form's first values: option defaults, replaced by a config's values; the config's other options
    become the extra-options YAML."""
    prefill = dict(prefill or {})
    values = {name: option_default(name) for name in TRAIN_FIELDS}
    values |= {"model_name_or_path": DEFAULT_MODEL, "output_dir": time.strftime("saves/webui-%Y%m%d-%H%M%S")}
    for name in TRAIN_FIELDS:
        if name in prefill:
            values[name] = coerce_value(name, prefill.pop(name))
    values["dataset"] = values["dataset"] or []
    return values, to_yaml(prefill) if prefill else ""


def parse_extra(text: str | None) -> dict[str, Any]:
    """The extra-options box: YAML `key: value` lines (any option of `lmforge train --help`)."""
    try:
        extra = yaml.safe_load(text or "")
    except yaml.YAMLError as err:
        raise LmforgeError(f"extra options: invalid YAML ({getattr(err, 'problem', err)})") from None
    if extra is None:
        return {}
    if not isinstance(extra, dict):
        raise LmforgeError(f"extra options must be YAML `key: value` lines, got {type(extra).__name__}")
    return extra


def _tidy(value: Any) -> Any:
    """Whole floats as ints (the number boxes give 2.0 for 2), so the YAML reads as a person writes it."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def form_options(values: dict[str, Any], extra: str | None = None) -> dict[str, Any]:
    """The options the form stands for: its filled fields (lora_rank only for LoRA; max_steps when > 0, else
    num_train_epochs), then the extra options, which take precedence."""
    options = {name: _tidy(values[name]) for name in TRAIN_FIELDS if values.get(name) not in (None, "", [])}
    if options.get("finetuning_type") != "lora":
        options.pop("lora_rank", None)
    if (options.get("max_steps") or 0) > 0:
        options.pop("num_train_epochs", None)
    else:
        options.pop("max_steps", None)
    return options | parse_extra(extra)


def to_yaml(options: dict[str, Any]) -> str:
    """The options as the YAML config `lmforge COMMAND CONFIG.yaml` reads."""
    return yaml.safe_dump(options, sort_keys=False, allow_unicode=True, default_flow_style=False)


def _cli_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value)
    return "null" if value is None else str(value)


def to_command(command: str, options: dict[str, Any]) -> str:
    """The same run as one command line."""
    return " ".join([f"lmforge {command}", *(f"--{k} {shlex.quote(_cli_value(v))}" for k, v in options.items())])


def literal_choices(cls: type, name: str) -> list[Any]:
    """The values a Literal-typed option accepts (None left out)."""
    import typing

    tp = field_types(cls)[name]
    members = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) is not typing.Literal \
        else [tp]
    return [c for m in members for c in typing.get_args(m)]


def filled(values: dict[str, Any]) -> dict[str, Any]:
    """The values a person filled in (empty boxes, empty lists and unset choices left out), whole floats as ints."""
    return {k: _tidy(v) for k, v in values.items() if v not in (None, "", [])}
