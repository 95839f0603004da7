"""Stage pt from token shards end to end: preprocess, train, and a crash resumed to the same weights bit for bit."""

import json
import math
from pathlib import Path

import pytest
import torch
from accelerate.data_loader import SeedableRandomSampler
from safetensors.torch import load_file
from transformers import TrainerCallback

from lmforge.cli import main
from lmforge.data.shard_reader import BlockOrder, TokenBlocks

ROOT = Path(__file__).resolve().parents[2]
BLOCKS = 38  # 32-token blocks of the 1,233 tokens of finance_corpus (24 documents, BOS text EOS)


def options(model_dir: Path, shards_dir: Path, out: Path) -> list[str]:
    return ["--stage", "pt", "--model_name_or_path", str(model_dir), "--dataset", "finance_corpus", "--dataset_dir",
            str(ROOT / "data"), "--tokenized_path", str(shards_dir), "--cutoff_len", "32", "--finetuning_type",
            "full", "--per_device_train_batch_size", "2", "--max_steps", "4", "--learning_rate", "1e-3", "--seed",
            "3", "--logging_steps", "1", "--report_to", "none", "--output_dir", str(out)]


@pytest.fixture(scope="module")
def shards_dir(tiny_llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pt-shards") / "tokenized"
    assert main(["preprocess", *options(tiny_llama_dir, folder, folder.parent / "unused")]) == 0
    return folder


@pytest.fixture()
def reads(monkeypatch):
    """Every block index training reads, in order."""
    seen: list[int] = []
    real = TokenBlocks.__getitem__
    monkeypatch.setattr(TokenBlocks, "__getitem__", lambda self, i: seen.append(i) or real(self, i))
    return seen


def step_losses(out: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def test_preprocess_writes_shards_and_train_reads_blocks_from_them(tiny_llama_dir, shards_dir, tmp_path, capsys,
                                                                    assert_moved, reads):
    manifest = json.loads((shards_dir / "shards.json").read_text())
    assert manifest["dtype"] == "uint16" and manifest["totals"] == {"shards": 1, "documents": 24, "tokens": 1233}
    assert main(["preprocess", *options(tiny_llama_dir, shards_dir, tmp_path / "unused")]) == 0
    assert "1 token shards (0 written, 1 already complete), 24 documents, 1233 tokens" in capsys.readouterr().out
    out = tmp_path / "run"
    assert main(["train", *options(tiny_llama_dir, shards_dir, out), "--save_strategy", "no", "--val_size", "4"]) == 0
    results = json.loads((out / "all_results.json").read_text())
    assert (results["train_examples"], results["train_tokens"]) == (BLOCKS - 4, (BLOCKS - 4) * 32)
    assert results["perplexity"] == pytest.approx(math.exp(results["eval_loss"]))  # 4 blocks held out, evaluated
    losses = step_losses(out)
    assert [s for s, _ in losses] == [1, 2, 3, 4] and all(math.isfinite(v) and v > 5 for _, v in losses)
    assert_moved(load_file(out / "model.safetensors"))
    assert len(reads) >= 8 and len(set(reads[:8])) == 8 and set(reads) <= set(range(BLOCKS))  # 4 steps of 2 blocks


class CrashAfterStep(TrainerCallback):
    """Stands in for a kill: the process dies at the start of the step after `step` (its checkpoint is saved)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError(f"killed after step {self.step}")


def test_a_run_killed_at_step_2_resumes_to_the_same_weights_and_skips_blocks_unread(
        tiny_llama_dir, shards_dir, tmp_path, monkeypatch, reads):
    import lmforge.train.causal_lm as causal_lm
    import lmforge.train.trainer as trainer

    samplers = []
    monkeypatch.setattr(trainer, "BlockOrder", lambda *a: samplers.append(BlockOrder(*a)) or samplers[-1])
    run = ["train", "--save_steps", "2"]
    whole = tmp_path / "whole"
    assert main([*run, *options(tiny_llama_dir, shards_dir, whole)]) == 0
    order = list(reads)
    crashed = tmp_path / "crashed"
    real = causal_lm.trainer_callbacks
    monkeypatch.setattr(causal_lm, "trainer_callbacks", lambda config: [*real(config), CrashAfterStep(2)])
    with pytest.raises(RuntimeError, match="killed after step 2"):
        main([*run, *options(tiny_llama_dir, shards_dir, crashed)])
    monkeypatch.setattr(causal_lm, "trainer_callbacks", real)
    assert (crashed / "checkpoint-2").is_dir() and not (crashed / "model.safetensors").exists()
    reads.clear()
    assert main([*run, *options(tiny_llama_dir, shards_dir, crashed)]) == 0  # the same command resumes
    assert len(order) == 10 and order != sorted(order)  # 4 steps of 2 shuffled blocks, and the batch fetched ahead
    # drawn by BlockOrder in the order accelerate's seeded sampler gave before it (seed 3)
    assert samplers and order[:8] == list(SeedableRandomSampler(range(samplers[0].count), data_seed=3))[:8]
    assert reads == order[4:]  # the blocks of steps 1-2 are skipped by index, never read
    a, b = load_file(whole / "model.safetensors"), load_file(crashed / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert step_losses(crashed) == step_losses(whole)
