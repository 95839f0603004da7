"""Peak memory of one training step (forward + backward) with the plain loss vs lmforge's chunked loss,
at a long sequence, for a small and a large vocabulary. Prints a markdown table.

    .venv/bin/python bench/loss_memory.py [--seq 4096] [--batch 1]

Each configuration runs in its own process; the figure is that process's peak RSS (VmHWM) minus
its RSS just before the step, so model weights and imports are not counted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmHWM: peak RSS, VmRSS: current)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def one(vocab: int, mode: str, seq: int, batch: int) -> dict:
    import time

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmforge.train.loss import capture_head_input, linear_cross_entropy

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, vocab, (batch, seq))  # (B, T)
    base = status_mb("VmRSS")
    start = time.perf_counter()
    if mode == "plain":
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    else:
        with capture_head_input(model.lm_head) as captured:
            model(input_ids=ids, use_cache=False)
        loss = linear_cross_entropy(captured["hidden"], model.lm_head, ids)
    loss.backward()
    return {"vocab": vocab, "loss": mode, "step_s": round(time.perf_counter() - start, 2),
            "extra_peak_mb": round(status_mb("VmHWM") - base), "loss_value": round(loss.item(), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--one", nargs=2, metavar=("VOCAB", "MODE"))
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(int(args.one[0]), args.one[1], args.seq, args.batch)))
        return
    rows = []
    for vocab in (32_000, 151_936):
        for mode in ("plain", "chunked"):
            out = subprocess.run([sys.executable, __file__, "--one", str(vocab), mode, "--seq", str(args.seq),
                                  "--batch", str(args.batch)], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"seq {args.seq}, batch {args.batch}, 2-layer Llama (hidden 256), one forward + backward, CPU float32\n")
    print("| vocab | loss | extra peak RSS (MB) | step (s) | loss value |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['vocab']:,} | {r['loss']} | {r['extra_peak_mb']:,} | {r['step_s']} | {r['loss_value']} |")


if __name__ == "__main__":
    main()
