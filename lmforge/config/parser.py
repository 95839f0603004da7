"""YAML + `--key value` overrides -> the typed option dataclasses, with errors that say what to change."""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from lmforge.config.args import (
    BUILTIN_REWARDS,
    ApiArguments,
    DataArguments,
    DoctorArguments,
    EvalArguments,
    ExportArguments,
    FinetuningArguments,
    GenerationArguments,
    LaunchArguments,
    ModelArguments,
    RLArguments,
    ScoreArguments,
    TrainingArguments,
    WebuiArguments,
)
from lmforge.config.sources import ALIASES, load_yaml, merge_sources, split_cli  # noqa: F401 (re-exported)
from lmforge.errors import LmforgeError
from lmforge.stages import BOUND_OPTIONS, STAGES, owners_of

GROUPS: tuple[type, ...] = (ModelArguments, DataArguments, FinetuningArguments, TrainingArguments, LaunchArguments,
                            RLArguments)
CHAT_GROUPS: tuple[type, ...] = (ModelArguments, GenerationArguments)
API_GROUPS: tuple[type, ...] = (ModelArguments, GenerationArguments, ApiArguments)
EXPORT_GROUPS: tuple[type, ...] = (ModelArguments, ExportArguments)
SCORE_GROUPS: tuple[type, ...] = (ScoreArguments,)
DOCTOR_GROUPS: tuple[type, ...] = (*GROUPS, DoctorArguments)
EVAL_GROUPS: tuple[type, ...] = (ModelArguments, DataArguments, EvalArguments)
WEBUI_GROUPS: tuple[type, ...] = (WebuiArguments,)


@dataclass
class TrainConfig:
    """Everything one run needs, plus which keys the user set explicitly."""

    model: ModelArguments
    data: DataArguments
    finetuning: FinetuningArguments
    training: TrainingArguments
    launch: LaunchArguments = field(default_factory=LaunchArguments)
    rl: RLArguments = field(default_factory=RLArguments)
    explicit: dict[str, Any] = field(default_factory=dict)
    config_path: str | None = None

    def __post_init__(self) -> None:
        """Checks that span option groups."""
        if self.model.quantization_bit:
            if self.finetuning.finetuning_type != "lora":
                raise LmforgeError(f"quantization_bit trains LoRA adapters on a frozen quantized base: set "
                                   f"finetuning_type: lora (not {self.finetuning.finetuning_type})")
            ds = getattr(self.training, "hf_deepspeed_config", None)
            if self.training.fsdp or (ds is not None and ds.is_zero3()):
                raise LmforgeError("quantization_bit is not supported with FSDP or DeepSpeed ZeRO-3 yet: "
                                   "use DDP (nproc_per_node) or ZeRO-2")
        self._check_stage_options()
        self._check_predict()
        self._check_label_smoothing()
        if "reward_model" in self.finetuning.spec.options:
            self._check_rewards()

    def _check_predict(self) -> None:
        """predict_with_generate: sft with unpacked eval rows; max_new_tokens means nothing without it in sft."""
        t, stage = self.training, self.finetuning.stage
        if not t.predict_with_generate:
            if stage == "sft" and self.rl.max_new_tokens != field_default(init_fields(RLArguments)["max_new_tokens"]):
                raise LmforgeError("max_new_tokens applies to stage sft only with predict_with_generate: true; "
                                   "set it or remove max_new_tokens")
            return
        if stage != "sft":
            raise LmforgeError(f"predict_with_generate applies to stage sft (replies scored against references), "
                               f"not {stage}: remove predict_with_generate")
        if not (self.data.val_size or self.data.eval_dataset):
            raise LmforgeError("predict_with_generate needs eval rows: set val_size (e.g. 0.1) or eval_dataset")
        if self.data.packing:
            raise LmforgeError("predict_with_generate reads whole eval conversations, which packing joins: "
                               "set packing: false, or run `lmforge eval` on the trained model")
        ds = getattr(t, "hf_deepspeed_config", None)
        if t.fsdp or (ds is not None and ds.is_zero3()):
            raise LmforgeError("predict_with_generate generates on one process, which FSDP and ZeRO-3 shard: run "
                               "`lmforge eval --eval_task generation` on the saved model instead")

    def _check_label_smoothing(self) -> None:
        """transformers' label smoother replaces the next-token loss; the other stages compute losses of their own."""
        stage = self.finetuning.stage
        if self.training.label_smoothing_factor and not self.finetuning.spec.perplexity:
            smoothed = " and ".join(s for s in STAGES if STAGES[s].perplexity)
            raise LmforgeError(f"label_smoothing_factor smooths the next-token loss of stage {smoothed}; stage {stage} "
                               f"computes its own loss: remove label_smoothing_factor")

    def _check_stage_options(self) -> None:
        """Refuse what the stage would not honour: another stage's options, packing, a sampler it overrides."""
        stage, spec = self.finetuning.stage, self.finetuning.spec
        if self.data.packing and not spec.packs:
            packers = " and ".join(s for s in STAGES if STAGES[s].packs)
            raise LmforgeError(f"packing applies to stage {packers}, not {stage}: set packing: false")
        if self.data.streaming and not spec.streams:
            streamers = " and ".join(s for s in STAGES if STAGES[s].streams)
            raise LmforgeError(f"streaming applies to stage {streamers}; stage {stage} reads its whole dataset (to "
                               "measure, pair or sample it): set streaming: false")
        groups = (self.finetuning, self.rl)
        for name in sorted(BOUND_OPTIONS - set(spec.options)):
            group = next(g for g in groups if name in init_fields(type(g)))
            if getattr(group, name) != field_default(init_fields(type(group))[name]):
                owners = owners_of(name)
                raise LmforgeError(f"{name} applies only to stage: {' or '.join(owners)}, but stage is {stage}: "
                                   f"set stage: {owners[0]} or remove {name}")
        sampler = self.training.train_sampling_strategy
        if spec.samplers is not None and "train_sampling_strategy" in self.explicit and sampler not in spec.samplers:
            honoured = f"only {', '.join(spec.samplers)}" if spec.samplers else "none: it orders the data itself"
            raise LmforgeError(f"stage {stage} cannot use train_sampling_strategy {sampler} (it honours "
                               f"{honoured}): remove train_sampling_strategy")

    def _check_rewards(self) -> None:
        rl = self.rl
        if not rl.sources:
            raise LmforgeError(f"stage {self.finetuning.stage} needs rewards: set reward_model: DIR (a model trained "
                               "with stage rm) and/or reward_funcs: exact_match,format,length or module:function")
        if rl.reward_model and not Path(rl.reward_model).is_dir():
            raise LmforgeError(f"reward_model {rl.reward_model} is not a folder: give the output_dir of an rm run")
        for name in rl.functions:
            if name not in BUILTIN_REWARDS and ":" not in name:
                raise LmforgeError(f"reward_funcs: unknown reward '{name}': use {', '.join(BUILTIN_REWARDS)} or "
                                   "module:function")
        t = self.training
        launched = (self.launch.nproc_per_node or 1) * (self.launch.nnodes or 1)
        world = int(os.environ.get("WORLD_SIZE", launched))
        batch = world * t.per_device_train_batch_size * t.gradient_accumulation_steps
        if batch % rl.num_generations:
            raise LmforgeError(f"the global batch ({world} process(es) x per_device_train_batch_size "
                               f"{t.per_device_train_batch_size} x gradient_accumulation_steps "
                               f"{t.gradient_accumulation_steps} = {batch}) must be divisible by num_generations "
                               f"{rl.num_generations}: change one of them")


class _Mismatch(Exception):
    pass


def init_fields(cls: type) -> dict[str, dataclasses.Field]:
    """The fields an option dataclass takes, by name."""
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def field_default(f: dataclasses.Field) -> Any:
    """A field's default value (None when it has none)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


# transformers types these `str` but also takes a bool (`fsdp: true`, the settings in fsdp_config).
TYPE_OVERRIDES: dict[str, Any] = {"fsdp": Union[bool, str, None]}


def field_types(cls: type) -> dict[str, Any]:
    """Each init field's type, with TYPE_OVERRIDES where transformers types a field narrower than it takes."""
    hints = typing.get_type_hints(cls)
    return {name: TYPE_OVERRIDES.get(name, hints.get(name, Any)) for name in init_fields(cls)}


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _priority(tp: Any) -> int:
    order = [bool, int, float, dict, list]
    base = typing.get_origin(tp) or tp
    if base in order:
        return order.index(base)
    if base is Literal or (isinstance(tp, type) and issubclass(tp, enum.Enum)):
        return 5
    return 6 if tp is str else 7


def _coerce(value: Any, tp: Any) -> Any:  # noqa: C901 - one branch per type family
    if tp is Any:
        return value
    if _is_union(tp):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        allows_none = len(members) < len(typing.get_args(tp))
        if value is None or (allows_none and isinstance(value, str) and value.lower() in ("null", "~")):
            if allows_none:
                return None
            raise _Mismatch
        for member in sorted(members, key=_priority):
            try:
                return _coerce(value, member)
            except (_Mismatch, ValueError, TypeError):
                continue
        raise _Mismatch
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise _Mismatch
    if tp is int:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, (int, str)):
            return int(value)
        raise _Mismatch
    if tp is float:
        if isinstance(value, bool):
            raise _Mismatch
        return float(value)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(value)
    if tp is dict or origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if isinstance(value, dict):
            return value
        raise _Mismatch
    if tp is list or origin is list:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            return list(value)
        if isinstance(value, (int, float)):  # `interleave_probs: 1` in YAML: a list of one
            return [value]
        raise _Mismatch
    return value


def describe_type(tp: Any) -> str:
    """A short human name for a field type, as shown in --help and in errors."""
    if _is_union(tp):
        parts = [describe_type(a) for a in typing.get_args(tp) if a is not type(None)]
        return " | ".join(dict.fromkeys(parts))
    if typing.get_origin(tp) is Literal:
        return "{" + ",".join(str(c) for c in typing.get_args(tp)) + "}"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "{" + ",".join(str(m.value) for m in tp) + "}"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def coerce_option(name: str, value: Any, tp: Any) -> Any:
    """Convert a YAML or command-line value to the field's type, or say what was expected."""
    try:
        return _coerce(value, tp)
    except (_Mismatch, ValueError, TypeError):
        raise LmforgeError(
            f"option '{name}' expects {describe_type(tp)}, got {value!r}: fix it in the YAML or on the command line"
        ) from None


def all_option_names(groups: tuple[type, ...] = GROUPS) -> dict[str, type]:
    """Every option name mapped to the dataclass that owns it, to route and check YAML keys."""
    return {name: cls for cls in groups for name in init_fields(cls)}


def _check_unknown(raw: dict[str, Any], known: dict[str, type], command: str | None = None) -> None:
    for key in raw:
        if key in known:
            continue
        from lmforge.config.llamafactory import commands_knowing

        owners = [c for c in commands_knowing(key) if c != command]
        if owners and command:
            raise LmforgeError(f"option '{key}' belongs to lmforge {' and '.join(owners)}, not lmforge {command}: "
                               "remove it")
        close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
        hint = f": did you mean '{close[0]}'?" if close else ": see `lmforge train --help` for the options"
        raise LmforgeError(f"unknown option '{key}'{hint}")


def build_groups(raw: dict[str, Any], groups: tuple[type, ...] = GROUPS) -> list[Any]:
    """Instantiate each dataclass from the keys that belong to it (types coerced), LLaMA-Factory's names
    translated first."""
    from lmforge.config.llamafactory import apply_lf_options, command_of

    raw = apply_lf_options(raw, groups)
    known = all_option_names(groups)
    _check_unknown(raw, known, command_of(groups))
    built = []
    for cls in groups:
        types_ = field_types(cls)
        kwargs = {k: coerce_option(k, v, types_[k]) for k, v in raw.items() if known[k] is cls}
        built.append(cls(**kwargs))
    return built


def parse_train_config(argv: list[str]) -> TrainConfig:
    """Parse `lmforge train` / `preprocess` arguments into a TrainConfig."""
    from lmforge.config.llamafactory import apply_lf_options

    config_path, raw = merge_sources(argv)
    raw = apply_lf_options(raw, GROUPS)
    model, data, finetuning, training, launch, rl = build_groups(raw)
    return TrainConfig(model, data, finetuning, training, launch, rl, explicit=dict(raw), config_path=config_path)


def format_help(groups: tuple[type, ...] = GROUPS, width: int = 100) -> str:
    """Every option with its type, default and help, grouped by dataclass."""
    lines = []
    for cls in groups:
        lines.append(f"\n{cls.__name__}: {(cls.__doc__ or '').strip().splitlines()[0]}")
        types_ = field_types(cls)
        for name, f in init_fields(cls).items():
            default = field_default(f)
            default = default.value if isinstance(default, enum.Enum) else default
            help_text = " ".join(str(f.metadata.get("help", "")).split())
            lines.append(f"  --{name} {describe_type(types_[name])} (default: {default!r})")
            if help_text:
                lines.append(_wrap(help_text, width, indent="      "))
    return "\n".join(lines)


def _wrap(text: str, width: int, indent: str) -> str:
    import textwrap

    return textwrap.fill(text, width=width, initial_indent=indent, subsequent_indent=indent)
