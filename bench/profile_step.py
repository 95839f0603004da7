"""Where one packed training step's time goes on CPU: LoRA on SmolLM2-135M, 4 packed rows of 1024 tokens,
forward + backward under torch.profiler: lmforge's variable-length sdpa (one causal call per example, what
`train` uses), a block-diagonal mask over the rows, and plain causal attention over the same tokens (which
would let examples see each other: timing only).

    .venv/bin/python bench/profile_step.py --model $BENCH_CACHE/models/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import time

import torch
from peft import LoraConfig, get_peft_model
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM

from lmforge.data.collator import COUNT_KEYS, VARLEN_SDPA, PackedCollator
from lmforge.model.varlen import use_varlen_sdpa

# example lengths of 4 packed rows, long-tailed as in the harness's chat data
ROWS = [[600, 200, 150, 74], [300, 300, 200, 224], [900, 124], [100] * 10 + [24]]


def batches() -> dict[str, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    features = []
    for lengths in ROWS:
        ids = torch.randint(100, 40000, (sum(lengths),)).tolist()
        features.append({"input_ids": ids, "labels": ids, "lengths": lengths})
    packed = PackedCollator(0, "sdpa")(features)
    varlen = PackedCollator(0, VARLEN_SDPA)(features)
    for key in COUNT_KEYS:
        packed.pop(key, None)
        varlen.pop(key, None)
    return {"packed (varlen sdpa)": varlen, "packed (block mask)": packed,
            "causal only": {"input_ids": packed["input_ids"], "labels": packed["labels"]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    args = parser.parse_args()
    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="sdpa", dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")).train()

    def step(batch: dict[str, torch.Tensor]) -> float:
        start = time.perf_counter()
        model(**batch).loss.backward()
        return time.perf_counter() - start

    print("| attention | step (s) | matmul (s) | attention kernels (s) | log-softmax (s) | other (s) |")
    print("|---|---|---|---|---|---|")
    for name, batch in batches().items():
        if "cu_seq_lens_q" in batch:
            use_varlen_sdpa(model)
        else:
            model.get_base_model().set_attn_implementation("sdpa")
        step(batch)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            seconds = step(batch)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / 1e6
        share = {label: sum(e.self_cpu_time_total for e in events if match(e.key)) / 1e6 for label, match in (
            ("mm", lambda k: k in ("aten::mm", "aten::addmm", "aten::bmm")),
            ("attn", lambda k: "scaled_dot_product" in k),
            ("softmax", lambda k: "log_softmax" in k))}
        other = total - sum(share.values())
        print(f"| {name} | {seconds:.1f} | {share['mm']:.1f} | {share['attn']:.1f} | {share['softmax']:.1f} | "
              f"{other:.1f} |")


if __name__ == "__main__":
    main()
