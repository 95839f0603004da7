"""Resolve `model_name_or_path` (directory, .gguf file or alias) and load tokenizer and model."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import yaml

from lmforge.cache import cache_root
from lmforge.config import ModelArguments
from lmforge.errors import LmforgeError

logger = logging.getLogger(__name__)
ALIASES_PATH = Path(__file__).with_name("aliases.yaml")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@lru_cache(maxsize=1)
def load_aliases() -> dict[str, dict[str, str]]:
    """The model aliases that resolve offline (model/aliases.yaml)."""
    return yaml.safe_load(ALIASES_PATH.read_text(encoding="utf-8"))


def alias_gguf_path(alias: str) -> Path:
    """The GGUF file an alias names, found through its package's install location."""
    entry = load_aliases()[alias]
    spec = importlib.util.find_spec(entry["package"])  # locates the package without importing it
    if spec is None or spec.origin is None:
        raise LmforgeError(f"model alias '{alias}' needs the package {entry['package']}: {entry['install']}")
    path = Path(spec.origin).parent / entry["file"]
    if not path.is_file():
        raise LmforgeError(f"model alias '{alias}': {path} is missing; reinstall with: {entry['install']}")
    return path


def dequantize_gguf(gguf: Path, target: Path) -> Path:
    """Load a GGUF file with transformers and save it once as a Hugging Face directory."""
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("de-quantizing %s into %s (once; later runs load the cache)", gguf, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as err:
        raise LmforgeError(f"{gguf}: transformers cannot load this GGUF file ({err})") from None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the weights are plain float32 now
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # another process finished first: use its copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name: str | None) -> str:
    """A local Hugging Face directory for a directory, a .gguf file or an alias."""
    if not name:
        raise LmforgeError("model_name_or_path is required: a model directory, a .gguf file or an alias")
    path = Path(name).expanduser()
    models_dir = cache_root() / "models"
    if name in load_aliases():
        return str(dequantize_gguf(alias_gguf_path(name), models_dir / name))
    if path.is_file() and path.suffix.lower() == ".gguf":
        for alias in load_aliases():  # the same file as an alias shares its de-quantized copy
            try:
                if alias_gguf_path(alias).resolve() == path.resolve():
                    return str(dequantize_gguf(path, models_dir / alias))
            except LmforgeError:
                continue
        stat = path.stat()
        tag = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        return str(dequantize_gguf(path, models_dir / f"{path.stem}-{tag}"))
    if path.is_dir():
        return str(path)
    known = ", ".join(load_aliases())
    raise LmforgeError(
        f"model '{name}' not found: give a local model directory, a .gguf file or an alias ({known}); "
        "lmforge does not download from a hub"
    )


def load_tokenizer(args: ModelArguments) -> Any:
    """The tokenizer of tokenizer_name_or_path or the model, with a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(args.tokenizer_name_or_path or args.model_name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as err:
        raise LmforgeError(f"cannot load a tokenizer from {path}: {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise LmforgeError(f"the tokenizer in {path} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _torch_dtype(name: str) -> Any:
    return "auto" if name == "auto" else DTYPES[name]


def _check_attention(name: str) -> None:
    if name == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            raise LmforgeError("attn_implementation flash_attention_2 needs flash-attn and a CUDA GPU: "
                               "pip install flash-attn, or use attn_implementation: sdpa")


def build_config(args: ModelArguments, tokenizer: Any) -> Any:
    """The architecture for training from scratch: a config file plus `model_config` overrides."""
    from transformers import AutoConfig

    overrides = dict(args.model_config)
    model_type = overrides.pop("model_type", None)
    if model_type:
        try:
            base = AutoConfig.for_model(model_type)
        except ValueError as err:
            raise LmforgeError(f"model_config.model_type: {err}") from None
    else:
        base = AutoConfig.from_pretrained(resolve_model_path(args.model_name_or_path),
                                          trust_remote_code=args.trust_remote_code)
    values = base.to_dict()
    for key in overrides:
        if key not in values and not hasattr(base, key):
            raise LmforgeError(f"model_config.{key}: {type(base).__name__} has no such field")
    if {"hidden_size", "num_attention_heads"} & overrides.keys() and "head_dim" not in overrides:
        values.pop("head_dim", None)  # derived from hidden_size / heads: recompute it
    config = type(base).from_dict({**values, **overrides})
    config.vocab_size = max(getattr(config, "vocab_size", 0) or 0, len(tokenizer))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config, name, getattr(tokenizer, name))
    return config


def _root_cause(err: BaseException) -> str:
    """The first line of the innermost error: transformers wraps config validation errors in a generic one."""
    while err.__cause__ is not None:
        err = err.__cause__
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _build_from_scratch(auto: Any, args: ModelArguments, tokenizer: Any, common: dict[str, Any],
                        reward_head: bool) -> Any:
    """Random weights from build_config; whatever transformers or torch refuses becomes one line naming
    model_config (or the config file, when there are no overrides)."""
    try:
        config = build_config(args, tokenizer)
        if reward_head:
            config.num_labels = 1
        return auto.from_config(config, **common)
    except LmforgeError:
        raise
    except Exception as err:
        source = ("model_config" if args.model_config
                  else f"the config of {args.model_name_or_path} (train_from_scratch)")
        raise LmforgeError(f"{source}: cannot build the model: {_root_cause(err)}") from None


def quantization_settings(args: ModelArguments, compute_dtype: torch.dtype) -> dict[str, Any]:
    """from_pretrained arguments for a bitsandbytes 4- or 8-bit base (QLoRA), or {} without quantization_bit."""
    if not args.quantization_bit:
        return {}
    if importlib.util.find_spec("bitsandbytes") is None:
        raise LmforgeError("quantization_bit needs bitsandbytes: pip install 'lmforge[bnb]'")
    from transformers import BitsAndBytesConfig

    if args.quantization_bit == 4:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=args.quantization_type,
                                    bnb_4bit_use_double_quant=args.double_quantization,
                                    bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=torch.uint8)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    # each process holds its whole (quantized) copy on its own device
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    return {"quantization_config": config, "device_map": {"": device}}


def load_model(args: ModelArguments, tokenizer: Any, compute_dtype: torch.dtype = torch.float32,
               reward_head: bool = False, placement: dict[str, Any] | None = None) -> Any:
    """Pretrained weights (optionally quantized, computing in `compute_dtype`), or random ones for
    `train_from_scratch`. With `reward_head`, the causal LM's body under a new one-output score head
    (a reward model: the score of the last non-padding token). `placement`: inference's device_map."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if reward_head else AutoModelForCausalLM

    _check_attention(args.attn_implementation)
    common = {"dtype": _torch_dtype(args.torch_dtype), "attn_implementation": args.attn_implementation,
              "trust_remote_code": args.trust_remote_code}
    if args.train_from_scratch:
        common["dtype"] = torch.float32 if common["dtype"] == "auto" else common["dtype"]
        return _build_from_scratch(auto, args, tokenizer, common, reward_head)
    if args.model_config:
        raise LmforgeError("model_config overrides the architecture and needs train_from_scratch: true")
    path = resolve_model_path(args.model_name_or_path)
    common["use_safetensors"] = check_weights(Path(path), args.allow_pickle_weights)
    common |= placement or {}
    common |= quantization_settings(args, compute_dtype)
    if args.quantization_bit and common["dtype"] == "auto":
        common["dtype"] = compute_dtype  # the layers left unquantized (norms, embeddings)
    try:
        model = auto.from_pretrained(path, **common, **({"num_labels": 1} if reward_head else {}))
    except (OSError, ValueError) as err:
        raise LmforgeError(f"cannot load a model from {path}: {str(err).splitlines()[0]}") from None
    if len(tokenizer) > embedding_rows(model):
        grow_embeddings(model, len(tokenizer))
    return model


def embedding_rows(model: Any) -> int:
    """The input embedding's rows; under DeepSpeed ZeRO-3 the local weight is an empty partition, and the full
    shape is `ds_shape`."""
    weight = model.get_input_embeddings().weight
    return getattr(weight, "ds_shape", weight.shape)[0]


@torch.no_grad()
def grow_embeddings(model: Any, size: int) -> None:
    """Resize the token embeddings (and an untied output head) to `size` rows; the new rows start at the mean
    of the old ones, so added tokens begin as an average token rather than noise."""
    old = embedding_rows(model)
    if hasattr(model.get_input_embeddings().weight, "ds_id"):  # ZeRO-3 partitions: transformers gathers them
        model.resize_token_embeddings(size)  # its mean_resizing starts new rows around the mean
        return
    model.resize_token_embeddings(size, mean_resizing=False)
    layers = [model.get_input_embeddings(), model.get_output_embeddings()]
    for layer in {id(m): m for m in layers if m is not None}.values():
        weight = layer.weight
        if weight.shape[0] == size:
            weight[old:] = weight[:old].float().mean(dim=0).to(weight.dtype)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def check_weights(path: Path, allow_pickle: bool) -> bool:
    """True when the folder has safetensors weights; pickle-only weights need allow_pickle_weights."""
    tensors = sorted(path.glob("*.safetensors"))
    for file in tensors:
        check_safetensors(file)
    if tensors:
        return True
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not pickled:
        raise LmforgeError(f"no model weights in {path}: expected model.safetensors (or sharded *.safetensors)")
    if not allow_pickle:
        raise LmforgeError(
            f"{path} has only pickle weights ({pickled[0]}), which can run arbitrary code when loaded: convert them "
            "to safetensors, or set allow_pickle_weights: true if you trust their source"
        )
    logger.warning("loading pickle weights %s from %s because allow_pickle_weights is set", pickled[0], path)
    return False


def check_safetensors(file: Path) -> None:
    """Read the file's header (not its tensors), which also checks that the file is as long as it says."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt"):
            pass
    except (SafetensorError, OSError) as err:
        raise LmforgeError(f"{file} is damaged ({_root_cause(err)}): download or export the model "
                           "again") from None


def count_parameters(model: Any) -> tuple[int, int]:
    """(total, trainable). Parameters shared between modules (tied embeddings) count once."""
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable
