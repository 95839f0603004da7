"""`lmforge export`: merge LoRA into the base, prove the merge exact on a probe, save safetensors
(or hand the merged model to the GGUF writer, export/gguf_export.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from lmforge.config import ExportArguments, ModelArguments
from lmforge.data.templates import CatalogueTemplate, get_template
from lmforge.errors import LmforgeError
from lmforge.model.adapters import adapter_base_model, fill_base_model, split_names
from lmforge.model.loader import DTYPES, load_model, load_tokenizer, resolve_model_path
from lmforge.train.outputs import write_model_card

logger = logging.getLogger(__name__)
PROBE = "The quick brown fox jumps over the lazy dog. 1, 2, 3: lmforge checks the merge."


def check_export_dir(path: str | None) -> Path:
    """The export folder, refused when not given or not empty, so nothing is overwritten."""
    if not path:
        raise LmforgeError("export_dir is required: where to write the merged model")
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LmforgeError(f"export_dir {out} is not empty: choose a new folder (nothing was written)")
    return out


def _is_quantized(model: Any) -> bool:
    return getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)


@torch.inference_mode()
def probe_logits(model: Any, tokenizer: Any) -> torch.Tensor:
    """The model's logits on a fixed probe text, to check the merged model matches base plus adapter."""
    ids = tokenizer(PROBE, return_tensors="pt")["input_ids"].to(model.device)
    return model(input_ids=ids).logits.double()  # (1, T, V)


def check_adapter_loaded(peft_model: Any, path: str) -> None:
    """Refuse an adapter whose weights did not all load: peft only warns about keys that match no parameter
    and leaves those LoRA weights at their initial values, so the merge check would compare the base with itself."""
    from peft.utils import get_peft_model_state_dict, load_peft_weights

    loaded = get_peft_model_state_dict(peft_model)  # the saved file's key names
    for key, value in load_peft_weights(path, device="cpu").items():
        if key not in loaded or not torch.equal(loaded[key].to(value), value):
            raise LmforgeError(f"{path}: adapter weight {key} matches no parameter of the base model (peft did not "
                               "load it): the adapter is for another model; give its base as model_name_or_path")
    lora_b = [p for name, p in peft_model.named_parameters() if ".lora_B." in name or ".lora_embedding_B." in name]
    if lora_b and not any(p.any() for p in lora_b):
        raise LmforgeError(f"{path}: all lora_B are zero, so merging changes nothing (an adapter trained 0 steps "
                           "is legitimately zero): train it, or export the base without adapter_name_or_path")


def merge_adapters(model: Any, tokenizer: Any, adapters: list[str], tolerance: float) -> tuple[Any, float]:
    """Merge every adapter in order; returns the merged model and max |logit difference| on the probe."""
    from peft import PeftModel

    diff = 0.0
    for path in adapters:
        adapter_base_model(path)  # a clear error when the folder is no adapter
        peft_model = PeftModel.from_pretrained(model, path)
        check_adapter_loaded(peft_model, path)
        expected = probe_logits(peft_model, tokenizer)
        model = peft_model.merge_and_unload()
        diff = max(diff, (probe_logits(model, tokenizer) - expected).abs().max().item())
    if diff > tolerance:
        raise LmforgeError(f"merged logits differ from base+adapter by {diff:.2e} > {tolerance:.0e}: "
                           "the merge is wrong; nothing was written")
    return model, diff


def prepare_export(model_args: ModelArguments, args: ExportArguments) -> tuple[Path, Any, list[str]]:
    """The checks that need no weights, then the tokenizer with the chat template to ship:
    (export folder, tokenizer, adapters to merge)."""
    if model_args.quantization_bit:
        raise LmforgeError(f"cannot merge into a {model_args.quantization_bit}-bit base: remove quantization_bit, "
                           "so the adapter (QLoRA's too) merges into the full-precision base model")
    out = check_export_dir(args.export_dir)
    fill_base_model(model_args)
    adapters = split_names(model_args.adapter_name_or_path)
    model_args.torch_dtype = "float32"
    tokenizer = load_tokenizer(model_args)
    if args.template:
        template = get_template(args.template, tokenizer)
        if isinstance(template, CatalogueTemplate):
            tokenizer.chat_template = template.to_jinja()
    return out, tokenizer, adapters


def load_merged(model_args: ModelArguments, tokenizer: Any, adapters: list[str], tolerance: float) -> tuple[Any, float]:
    """The base model with every adapter merged, in float64, and the merge's max |logit difference|."""
    model = load_model(model_args, tokenizer)
    if _is_quantized(model):
        raise LmforgeError("cannot merge into a 4/8-bit base: load the base without quantization_bit "
                           "(de-quantized, e.g. bfloat16) and export again")
    # Merge and check in float64: in float32 a correct merge of a 30-layer model already differs from
    # base+adapter by ~1e-4 through rounding, which would hide a wrong merge. Costs 2x float32 memory.
    model = model.double()
    return merge_adapters(model, tokenizer, adapters, tolerance) if adapters else (model, 0.0)


def run_export(model_args: ModelArguments, args: ExportArguments) -> dict[str, Any]:
    """Merge the adapters into the full-precision base model, checked against the unmerged model, and
    write it as a Hugging Face folder or, with export_format gguf, as one .gguf file."""
    out, tokenizer, adapters = prepare_export(model_args, args)
    if args.export_format == "gguf":
        from lmforge.export.gguf_export import plan_gguf, save_gguf

        plan = plan_gguf(model_args, tokenizer, args)  # refuses an architecture or template before loading
        model, diff = load_merged(model_args, tokenizer, adapters, args.check_tolerance)
        return save_gguf(plan, model, tokenizer, out) | {"merged_adapters": adapters, "max_abs_logit_diff": diff}
    model, diff = load_merged(model_args, tokenizer, adapters, args.check_tolerance)
    return save_hf(model, tokenizer, out, model_args, args, diff) | {"merged_adapters": adapters,
                                                                     "max_abs_logit_diff": diff}


def save_hf(model: Any, tokenizer: Any, out: Path, model_args: ModelArguments, args: ExportArguments,
            diff: float) -> dict[str, Any]:
    """Sharded safetensors, the tokenizer and a model card."""
    adapters = split_names(model_args.adapter_name_or_path)
    dtype = _export_dtype(args.export_dtype, model_args)
    model = model.to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size=f"{int(args.export_size * 1000)}MB")
    tokenizer.save_pretrained(out)
    export_dtype = str(dtype).replace("torch.", "")
    write_model_card(out, base_model=str(model_args.model_name_or_path), stage="export",
                     method="merged lora" if adapters else "copy", datasets="see the adapter's card",
                     hyperparameters={"adapters": ", ".join(adapters) or "none", "export_dtype": export_dtype},
                     results={"max_abs_logit_diff": diff}, is_adapter=False)
    return {"export_format": "hf", "export_dtype": export_dtype}


def _export_dtype(name: str, model_args: ModelArguments) -> torch.dtype:
    """export_dtype, or for auto the dtype the base checkpoint was saved in."""
    if name != "auto":
        return DTYPES[name]
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model_path(model_args.model_name_or_path))
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype
