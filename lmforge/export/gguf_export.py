"""The GGUF branch of `lmforge export`: checks that need no weights (architecture, Ollama template), then the
.gguf file and, with export_ollama, a Modelfile beside it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.atomic import write_text_atomically
from lmforge.config import ExportArguments, ModelArguments
from lmforge.data.templates import TemplateSpec
from lmforge.export.gguf import gguf_arch, write_gguf
from lmforge.export.ollama import modelfile_text, training_template
from lmforge.model.loader import resolve_model_path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GgufPlan:
    """What save_gguf writes, settled before the weights are loaded."""

    gguf_type: str
    name: str  # general.name: the base model's folder or alias
    ollama: TemplateSpec | None  # the catalogue template for the Modelfile, with export_ollama


def plan_gguf(model_args: ModelArguments, tokenizer: Any, args: ExportArguments) -> GgufPlan:
    """Refuse an architecture the GGUF writer does not know, or (with export_ollama) a chat template that is
    none of the catalogue's, before any weight is loaded."""
    from transformers import AutoConfig

    path = resolve_model_path(model_args.model_name_or_path)
    gguf_arch(AutoConfig.from_pretrained(path, trust_remote_code=model_args.trust_remote_code))
    spec = training_template(tokenizer, args.template) if args.export_ollama else None
    name = Path(str(model_args.model_name_or_path)).name
    # transformers reads a file named exactly "mistral" as a GGUF architecture "mistral", which gguf-py lacks
    return GgufPlan(args.gguf_type or "f16", f"{name}-model" if name == "mistral" else name, spec)


def save_gguf(plan: GgufPlan, model: Any, tokenizer: Any, out: Path) -> dict[str, Any]:
    """`<export_dir name>-<type>.gguf` (and a Modelfile) in the export folder; returns what was written."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{out.name}-{plan.gguf_type}.gguf"
    found = write_gguf(model, tokenizer, path, plan.gguf_type, plan.name)
    if found["tokenizer_mismatch"]:
        logger.warning("GGUF export: transformers reads the tokenizer back differently (%s); llama.cpp uses the "
                       "pre-tokenizer '%s'", found["tokenizer_mismatch"], found["tokenizer_pre"])
    modelfile = None
    if plan.ollama is not None:
        modelfile = out / "Modelfile"
        write_text_atomically(modelfile, modelfile_text(path.name, plan.ollama, tokenizer, found["add_bos"]))
    return {"export_format": "gguf", "gguf_file": str(path), "gguf_type": plan.gguf_type,
            "size_mb": path.stat().st_size / 1e6, "modelfile": str(modelfile) if modelfile else None,
            "tokenizer_round_trip": found["tokenizer_round_trip"]}
