"""Which parameters learn: full, freeze (chosen blocks/modules) or LoRA through peft."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.config import FinetuningArguments, ModelArguments
from lmforge.errors import LmforgeError
from lmforge.model.loader import load_model, load_tokenizer

logger = logging.getLogger(__name__)


def split_names(value: str | list[str] | None) -> list[str]:
    """A list option's names (the option dataclasses already hold lists; a comma-separated string is split)."""
    parts = value.split(",") if isinstance(value, str) else value or []
    return [v.strip() for v in parts if v.strip()]


def adapter_base_model(adapter_dir: str) -> str | None:
    """The base model an adapter was trained on, as written in its adapter_config.json."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise LmforgeError(f"{adapter_dir} is not a LoRA adapter (no adapter_config.json)")
    return json.loads(path.read_text()).get("base_model_name_or_path")


def record_base_model(adapter_dir: str, name: str) -> None:
    """Write the name the user gave (an alias stays an alias) as the adapter's base model."""
    path = Path(adapter_dir) / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = name
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def fill_base_model(model_args: ModelArguments, default: str | None = None) -> None:
    """Chat and export: without model_name_or_path, use the adapter's base model (else `default`)."""
    adapters = split_names(model_args.adapter_name_or_path)
    if not model_args.model_name_or_path:
        model_args.model_name_or_path = (adapter_base_model(adapters[0]) if adapters else None) or default
    if adapters and not model_args.tokenizer_name_or_path and (Path(adapters[-1]) / "tokenizer_config.json").is_file():
        model_args.tokenizer_name_or_path = adapters[-1]  # the adapter's tokenizer carries the trained template


def inference_device(device: str) -> str:
    """The `device` option (auto, cpu, cuda) resolved to cpu or cuda: auto is cuda when a GPU is visible; cuda
    without one is an error."""
    import torch

    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if not torch.cuda.is_available():
        raise LmforgeError("device cuda: no CUDA GPU is visible (check CUDA_VISIBLE_DEVICES), or use --device cpu")
    return "cuda"


def inference_placement(device: str) -> dict[str, Any]:
    """from_pretrained arguments that place an inference model: on the GPU with device_map auto (spread over
    several when one does not hold it), else on the CPU. `device`: auto, cpu or cuda."""
    return {"device_map": "auto"} if inference_device(device) == "cuda" else {}


def load_merged(model_args: ModelArguments, reward_head: bool = False, device: str = "cpu") -> tuple[Any, Any]:
    """Tokenizer and model in eval mode with every adapter of adapter_name_or_path merged in (inference and
    scoring; fill_base_model first when the base is to come from the adapter), placed by `device` (auto: the
    GPU when there is one)."""
    from peft import PeftModel

    tokenizer = load_tokenizer(model_args)
    model = load_model(model_args, tokenizer, reward_head=reward_head, placement=inference_placement(device))
    for path in split_names(model_args.adapter_name_or_path):
        model = PeftModel.from_pretrained(model, path).merge_and_unload()
    return tokenizer, model.eval()


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks (name, module), found by the config's layer count."""
    count = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return name, module
    raise LmforgeError(f"cannot find the {count} transformer blocks of {type(model).__name__} for freeze tuning")


def linear_module_names(model: nn.Module) -> list[str]:
    """Short names of every linear layer except the output head: what `lora_target: all` adapts."""
    output = model.get_output_embeddings() or getattr(model, "score", None)  # LM head or reward head
    names = {name.split(".")[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not output}
    return sorted(names)


def _upcast_trainable(model: nn.Module) -> None:
    """Trainable weights in float32 so the optimizer never updates half-precision weights."""
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()


def setup_full(model: nn.Module) -> nn.Module:
    """Full fine-tuning: every parameter trainable."""
    for p in model.parameters():
        p.requires_grad_(True)
    _upcast_trainable(model)
    return model


def setup_freeze(model: nn.Module, args: FinetuningArguments) -> nn.Module:
    """Freeze fine-tuning: train only the chosen blocks (and modules), the rest frozen."""
    prefix, layers = decoder_layers(model)
    n = args.freeze_trainable_layers
    if abs(n) > len(layers):
        raise LmforgeError(f"freeze_trainable_layers is {n} but the model has {len(layers)} blocks")
    chosen = range(len(layers) - n, len(layers)) if n > 0 else range(-n)
    modules = split_names(args.freeze_trainable_modules)
    available = sorted({name.split(".")[0] for name, _ in layers[0].named_children()} |
                       {name.split(".")[-1] for name, _ in layers[0].named_modules() if name})
    if modules != ["all"]:
        unknown = [m for m in modules if m not in available]
        if unknown:
            raise LmforgeError(f"freeze_trainable_modules: {unknown} not in a block; available: {', '.join(available)}")
    extra = split_names(args.freeze_extra_modules)
    for m in extra:
        if not any(m in name.split(".") for name, _ in model.named_modules()):
            raise LmforgeError(f"freeze_extra_modules: no module named '{m}' in the model")
    prefixes = tuple(f"{prefix}.{i}." for i in chosen)
    for name, p in model.named_parameters():
        parts = name.split(".")
        in_block = name.startswith(prefixes) and (modules == ["all"] or any(m in parts for m in modules))
        p.requires_grad_(in_block or any(m in parts for m in extra))
    _upcast_trainable(model)
    return model


def _load_adapters(model: nn.Module, paths: list[str]) -> nn.Module:
    """Merge all but the last adapter into the base; the last stays trainable."""
    from peft import PeftModel

    for path in paths[:-1]:
        model = PeftModel.from_pretrained(model, path).merge_and_unload()
    logger.info("continuing training of the adapter in %s (its own LoRA settings apply)", paths[-1])
    return PeftModel.from_pretrained(model, paths[-1], is_trainable=True)


def setup_lora(model: nn.Module, args: FinetuningArguments, model_args: ModelArguments) -> nn.Module:
    """Wrap the model with LoRA adapters, new or loaded from adapter_name_or_path."""
    from peft import LoraConfig, get_peft_model

    adapters = split_names(model_args.adapter_name_or_path)
    if adapters:
        model = _load_adapters(model, adapters)
    else:
        available = linear_module_names(model)
        targets = available if split_names(args.lora_target) == ["all"] else split_names(args.lora_target)
        unknown = [t for t in targets if t not in available]
        if unknown:
            raise LmforgeError(f"lora_target: {unknown} are not linear layers of this model; "
                               f"available: {', '.join(available)} (or all)")
        reward = getattr(model, "score", None) is not None and model.get_output_embeddings() is None
        save = split_names(args.additional_target)
        if getattr(model_args, "resize_vocab", False) and not save:  # the added tokens' rows must learn
            save = embedding_module_names(model)
            logger.info("resize_vocab: training %s in full beside LoRA (set additional_target to choose)", save)
        config = LoraConfig(
            task_type="SEQ_CLS" if reward else "CAUSAL_LM",  # SEQ_CLS also trains the new score head in full
            r=args.lora_rank, lora_alpha=args.effective_lora_alpha,
            lora_dropout=args.lora_dropout, target_modules=targets, use_dora=args.use_dora,
            use_rslora=args.use_rslora, modules_to_save=save or None,
        )
        model = get_peft_model(model, config)
    _upcast_trainable(model)
    return model


def embedding_module_names(model: nn.Module) -> list[str]:
    """The short names of the input embedding and output head (embed_tokens, lm_head for Llama)."""
    wanted = {id(m) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    return list(dict.fromkeys(name.rsplit(".", 1)[-1] for name, m in model.named_modules() if id(m) in wanted))


def setup_finetuning(model: nn.Module, args: FinetuningArguments, model_args: ModelArguments,
                     gradient_checkpointing: bool = False) -> nn.Module:
    """Mark the parameters that learn according to `finetuning_type`."""
    if model_args.adapter_name_or_path and args.finetuning_type != "lora":
        raise LmforgeError("adapter_name_or_path needs finetuning_type: lora")
    if args.finetuning_type == "full":
        return setup_full(model)
    if getattr(model, "is_quantized", False):
        from peft import prepare_model_for_kbit_training

        # norms and embeddings to float32 for stable training; the 4/8-bit weights stay as they are
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need grads
    if args.finetuning_type == "freeze":
        return setup_freeze(model, args)
    return setup_lora(model, args, model_args)
