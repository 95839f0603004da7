"""Packing isolation end to end: `lmforge train` packed and unpacked on the same rows, with every optimizer
step holding the same examples, gives the same losses and the same LoRA weights.

Best-fit-decreasing reorders examples (longest first) and the packed rows are shuffled, so a packed
batch of one row and an unpacked batch of one example hold different examples. Here every step holds
all the rows: one batch of all of them, or batches of one accumulated over the whole epoch. The loss
is the mean over the step's loss tokens either way, so the runs must agree to float rounding, and
they would not if a packed example could attend to its neighbours.
"""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lmforge.cli import main

# six conversations of 39 to 62 tokens (SmolLM2's default system prompt included): with cutoff_len 128
# they pack two to a row, in 3 rows
ROWS = [
    ("What is a bond?", "A loan to a company or a government that pays interest."),
    ("Name a primary colour.", "Red."),
    ("Why do leaves fall in autumn?", "Trees shed them to save water and energy through the cold months, "
                                      "when there is too little light to make food."),
    ("What is 2 + 2?", "2 + 2 is 4."),
    ("Give a synonym for quick.", "Fast, rapid or swift."),
    ("How many legs has a spider?", "A spider has eight legs."),
]
STEPS = 3


@pytest.fixture(scope="module")
def rows_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("packing-rows")
    (folder / "rows.jsonl").write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in ROWS))
    return folder


def train(model_dir: Path, data_dir: Path, out: Path, packing: bool, batch: int, accumulation: int) -> Path:
    """STEPS plain-SGD steps of LoRA on ROWS in their file order."""
    code = main(["train", "--model_name_or_path", str(model_dir), "--dataset", "rows.jsonl", "--dataset_dir",
                 str(data_dir), "--cutoff_len", "128", "--packing", str(packing).lower(), "--finetuning_type", "lora",
                 "--lora_rank", "4", "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps",
                 str(accumulation), "--max_steps", str(STEPS), "--optim", "sgd", "--learning_rate", "0.5",
                 "--lr_scheduler_type", "constant", "--max_grad_norm", "0", "--train_sampling_strategy", "sequential",
                 "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--output_dir", str(out)])
    assert code == 0
    return out


def step_logs(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]


@pytest.mark.parametrize("layout", ["one batch", "accumulation"])
def test_packed_training_equals_unpacked(tiny_llama_dir, rows_dir, tmp_path, layout):
    # one batch: every row (6 unpacked, 3 packed) in a batch; accumulation: batches of one, 6 accumulated
    # (the packed run's epoch ends after its 3 rows, which closes the step)
    batch, accumulation = (len(ROWS), 1) if layout == "one batch" else (1, len(ROWS))
    unpacked = train(tiny_llama_dir, rows_dir, tmp_path / "unpacked", False, batch, accumulation)
    packed = train(tiny_llama_dir, rows_dir, tmp_path / "packed", True, batch, accumulation)
    logs = {"unpacked": step_logs(unpacked), "packed": step_logs(packed)}
    assert [r["step"] for r in logs["packed"]] == [r["step"] for r in logs["unpacked"]] == list(range(1, STEPS + 1))
    # 287 tokens in 3 rows of 128: two examples share each row
    assert all(r["packing_efficiency"] == round(287 / (3 * 128), 4) for r in logs["packed"])
    assert all(r["padding_fraction"] == 0 for r in logs["packed"])
    losses = [(u["loss"], p["loss"]) for u, p in zip(logs["unpacked"], logs["packed"])]
    assert all(abs(u - p) <= 1e-5 for u, p in losses), losses
    assert losses[-1][0] < losses[0][0]  # the steps did train
    a, b = (load_file(out / "adapter_model.safetensors") for out in (unpacked, packed))
    assert sorted(a) == sorted(b)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    lora_b = [k for k in a if "lora_B" in k]  # zero at the start: the trained adapter moved away from it
    assert lora_b and max(a[k].abs().max().item() for k in lora_b) > 1e-4
