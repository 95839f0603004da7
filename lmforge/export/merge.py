"""`lmforge export`: merge LoRA into the base layer by layer, each merge proved exact in float64 on a probe,
then save safetensors (or hand the merged model to the GGUF writer, export/gguf_export.py)."""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from lmforge.config import ExportArguments, ModelArguments
from lmforge.data.templates import CatalogueTemplate, template_for
from lmforge.errors import LmforgeError
from lmforge.model.adapters import adapter_base_model, fill_base_model, inference_device, split_names
from lmforge.model.loader import DTYPES, load_model, load_tokenizer, resolve_model_path
from lmforge.train.outputs import write_model_card

logger = logging.getLogger(__name__)
PROBE_ROWS = 4  # random inputs per linear layer: any wrong weight changes the output of one, almost surely
PROBE_IDS = 256  # token ids per embedding layer: an embedding's merge is checked on the rows these pick


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


def lora_layers(peft_model: Any) -> dict[str, Any]:
    """Every LoRA layer (linear, embedding; DoRA and rsLoRA are linear ones) by its module name."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)}


def check_untied(peft_model: Any, layers: dict[str, Any]) -> None:
    """Refuse a LoRA layer whose base weight another module shares (tied input and output embeddings):
    merging into it would change that module too, which no per-layer check sees."""
    owners = defaultdict(list)
    for name, param in peft_model.named_parameters(remove_duplicate=False):
        owners[id(param)].append(name)
    for name, layer in layers.items():
        others = [n for n in owners[id(layer.get_base_layer().weight)]
                  if not n.startswith(f"{name}.") and ".original_module." not in n]  # modules_to_save: replaced
        if others:
            raise LmforgeError(f"{name}: its LoRA weight is tied to {others[0]} (tie_word_embeddings), so merging "
                               "would change both: train the adapter without that module in lora_target")


def probe_input(layer: Any, device: str) -> torch.Tensor:
    """A seeded random input for one LoRA layer: float64 rows for a linear layer, token ids for an embedding."""
    from peft.tuners import lora

    generator = torch.Generator().manual_seed(0)
    if isinstance(layer, lora.Embedding):
        return torch.randint(layer.in_features, (PROBE_IDS,), generator=generator).to(device)  # (N,)
    if isinstance(layer, lora.Linear):
        rows = torch.randn(PROBE_ROWS, layer.in_features, generator=generator, dtype=torch.float64)
        return rows.to(device)  # (N, in_features)
    raise LmforgeError(f"cannot check the merge of a {type(layer).__name__} LoRA layer: lmforge export merges "
                       "LoRA on linear and embedding layers")


@torch.no_grad()
def merge_layer(layer: Any, device: str) -> float:
    """Merge one LoRA layer with peft's own merge (so DoRA and rsLoRA are peft's math) in float64 on `device`,
    then cast it back to its dtype and device: the merged weight is rounded once. Returns the largest
    |output difference| on a probe between the layer before merging (base+adapter) and after."""
    weight = layer.get_base_layer().weight
    dtype, home = weight.dtype, weight.device
    layer.to(device).double()  # moved first: with a GPU the host never holds this layer in float64
    probe = probe_input(layer, device)
    expected = layer(probe)
    layer.merge()
    diff = (layer(probe) - expected).abs().max().item()
    layer.to(dtype).to(home)
    return diff


def merge_adapters(model: Any, adapters: list[str], tolerance: float, device: str = "cpu") -> tuple[Any, float]:
    """Merge every adapter in order, one LoRA layer at a time (see merge_layer), so only that layer is ever
    float64; returns the merged model and the largest |layer output difference| from base+adapter.

    No end-to-end logits check: in the working dtype (bfloat16 for most checkpoints) a correct merge's logits
    differ from base+adapter by rounding as large as a small adapter's whole effect, so no tolerance tells a
    wrong merge from a right one, and it costs two forward passes of the whole model on the CPU. The per-layer
    check covers every merged weight exactly; check_untied covers the one way a merge reaches another module."""
    from peft import PeftModel

    diff = 0.0
    for path in adapters:
        adapter_base_model(path)  # a clear error when the folder is no adapter
        peft_model = PeftModel.from_pretrained(model, path).eval()
        check_adapter_loaded(peft_model, path)
        layers = lora_layers(peft_model)
        check_untied(peft_model, layers)
        for name, layer in layers.items():
            layer_diff = merge_layer(layer, device)
            if layer_diff > tolerance:
                raise LmforgeError(f"{name}: the merged layer's output differs from base+adapter by {layer_diff:.2e} "
                                   f"> check_tolerance {tolerance:.0e} (float64): the merge is wrong; nothing was written")
            diff = max(diff, layer_diff)
        model = unload(peft_model)
    return model, diff


def unload(peft_model: Any) -> Any:
    """The base model with the merged layers, the trained copies of modules_to_save, and tie_word_embeddings
    turned off when those copies made the embeddings diverge: peft's merge_and_unload does all that, and finds
    every LoRA layer already merged (merge_adapters merged them all), which it says once per layer."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="All adapters are already merged")
        return peft_model.merge_and_unload()


def prepare_export(model_args: ModelArguments, args: ExportArguments) -> tuple[Path, Any, list[str]]:
    """The checks that need no weights, then the tokenizer with the chat template to ship:
    (export folder, tokenizer, adapters to merge)."""
    if model_args.quantization_bit:
        raise LmforgeError(f"cannot merge into a {model_args.quantization_bit}-bit base: remove quantization_bit, "
                           "so the adapter (QLoRA's too) merges into the full-precision base model")
    out = check_export_dir(args.export_dir)
    fill_base_model(model_args)
    adapters = split_names(model_args.adapter_name_or_path)
    tokenizer = load_tokenizer(model_args)
    model_args.torch_dtype = working_dtype(model_args, args)
    if args.template:
        template = template_for(args, tokenizer)
        if isinstance(template, CatalogueTemplate):
            tokenizer.chat_template = template.to_jinja()
    return out, tokenizer, adapters


def working_dtype(model_args: ModelArguments, args: ExportArguments) -> str:
    """The dtype the base is loaded and merged in: the one it is saved in, so the host holds one copy of the
    model in that dtype (GGUF: float32, from which its writer converts every tensor). A checkpoint wider than
    export_dtype is rounded at load, so its merged weights are rounded twice, within one unit of the last place."""
    if args.export_format == "gguf":
        return "float32"
    name = str(_export_dtype(args.export_dtype, model_args)).removeprefix("torch.")
    return name if name in DTYPES else "float32"


def merge_device(name: str) -> str:
    """export_device resolved: auto is the GPU when one is visible, else the CPU (said in the log)."""
    device = inference_device(name)
    if name == "auto" and device == "cpu":
        logger.info("export_device auto: no CUDA GPU is visible, merging on the CPU")
    return device


def load_merged(model_args: ModelArguments, tokenizer: Any, adapters: list[str],
                args: ExportArguments) -> tuple[Any, float]:
    """The base model with every adapter merged, in the working dtype, and the largest |layer output
    difference| of the merge."""
    model = load_model(model_args, tokenizer)
    if _is_quantized(model):
        raise LmforgeError("cannot merge into a 4/8-bit base: load the base without quantization_bit "
                           "(de-quantized, e.g. bfloat16) and export again")
    if not adapters:
        return model, 0.0
    return merge_adapters(model, adapters, args.check_tolerance, merge_device(args.export_device))


def run_export(model_args: ModelArguments, args: ExportArguments) -> dict[str, Any]:
    """Merge the adapters into the full-precision base model, each layer checked against base+adapter, and
    write it as a Hugging Face folder or, with export_format gguf, as one .gguf file."""
    out, tokenizer, adapters = prepare_export(model_args, args)
    if args.export_format == "gguf":
        from lmforge.export.gguf_export import plan_gguf, save_gguf

        plan = plan_gguf(model_args, tokenizer, args)  # refuses an architecture or template before loading
        model, diff = load_merged(model_args, tokenizer, adapters, args)
        return save_gguf(plan, model, tokenizer, out) | merge_report(adapters, diff)
    model, diff = load_merged(model_args, tokenizer, adapters, args)
    return save_hf(model, tokenizer, out, model_args, args, diff) | merge_report(adapters, diff)


def merge_report(adapters: list[str], diff: float) -> dict[str, Any]:
    """The merge's part of run_export's result: the adapters and the largest per-layer float64 difference."""
    return {"merged_adapters": adapters, "max_abs_layer_diff": diff}


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
                     results={"max_abs_layer_diff": diff}, is_adapter=False)
    return {"export_format": "hf", "export_dtype": export_dtype}


def _export_dtype(name: str, model_args: ModelArguments) -> torch.dtype:
    """export_dtype, or for auto the dtype the base checkpoint was saved in."""
    if name != "auto":
        return DTYPES[name]
    from transformers import AutoConfig

    path = resolve_model_path(model_args.model_name_or_path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=model_args.trust_remote_code)
    except (OSError, ValueError) as err:
        raise LmforgeError(f"cannot read the model config in {path}: {str(err).splitlines()[0]}") from None
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype
