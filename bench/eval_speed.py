"""Generation throughput of `lmforge eval` (rows/s) with the embedded SmolLM2-135M-Instruct on the first
rows of data/alpaca_demo.json, greedy, at several batch sizes. Prints a markdown table.

    .venv/bin/python bench/eval_speed.py [--rows 16] [--max_new_tokens 64] [--batch_sizes 1,8,16]

Each batch size runs `lmforge eval` in-process once after a warm-up run of one batch (the model is
de-quantized from its GGUF file into lmforge's cache on first use); rows/s counts generation only, not
loading or scoring.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def eval_once(rows: int, max_new_tokens: int, batch_size: int, out: Path) -> dict:
    """One `lmforge eval --eval_task generation` run; returns its generation results."""
    from lmforge.cli import main

    code = main(["eval", "--model_name_or_path", "smollm2-135m-instruct", "--dataset", "alpaca_demo",
                 "--dataset_dir", str(ROOT / "data"), "--max_samples", str(rows), "--eval_task", "generation",
                 "--max_new_tokens", str(max_new_tokens), "--batch_size", str(batch_size), "--output_dir", str(out)])
    if code != 0:
        raise SystemExit(f"lmforge eval failed with exit code {code}")
    return json.loads((out / "eval_results.json").read_text())["generation"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--batch_sizes", default="1,8,16")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        eval_once(2, 4, 2, Path(tmp) / "warmup")
        print("| batch_size | rows | max_new_tokens | rows/s | exact match | BLEU-4 | ROUGE-L |")
        print("|---|---|---|---|---|---|---|")
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            r = eval_once(args.rows, args.max_new_tokens, batch, Path(tmp) / f"b{batch}")
            print(f"| {batch} | {r['rows']} | {args.max_new_tokens} | {r['rows_per_second']:.2f} | "
                  f"{r['exact_match']:.1f} | {r['bleu-4']:.1f} | {r['rouge-l']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
