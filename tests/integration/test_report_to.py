"""report_to through transformers' own integrations, offline: every logged step's train loss and learning rate
reach TensorBoard's event files (every stage), a W&B offline run and a SwanLab offline run, with the values
written to trainer_log.jsonl."""

import glob
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.cli import main

ROOT = Path(__file__).resolve().parents[2]
STEPS = [1, 2, 3]
STAGE_ARGS = {
    "sft": ["--dataset", "alpaca_demo"],
    "dpo": ["--dataset", "dpo_demo"],
    "rm": ["--dataset", "dpo_demo"],
    "kto": ["--dataset", "kto_demo"],
    "grpo": ["--dataset", "rl_demo", "--reward_funcs", "length", "--num_generations", "2", "--max_new_tokens", "4"],
}


def train(tmp_path: Path, model_dir: Path, stage: str, tracker: str) -> list[dict]:
    """Three logged steps of `stage` reported to `tracker`; the loss and lr records of trainer_log.jsonl."""
    out = tmp_path / "out"
    assert main(["train", "--stage", stage, "--model_name_or_path", str(model_dir), *STAGE_ARGS[stage],
                 "--dataset_dir", str(ROOT / "data"), "--output_dir", str(out), "--max_steps", "3",
                 "--per_device_train_batch_size", "4", "--lora_rank", "4", "--logging_steps", "1",
                 "--save_strategy", "no", "--report_to", tracker]) == 0
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == STEPS
    return steps


def assert_logged(values: dict[str, list[tuple[int, float]]], steps: list[dict]) -> None:
    """The tracker holds (step, value) of the loss and learning rate for every logged step, equal to
    trainer_log.jsonl's (TensorBoard keeps float32: a loss near 11 within 1e-6, a learning rate to 1e-6 of itself)."""
    for key, jsonl_key, tolerance in (("train/loss", "loss", {"abs": 1e-6}),
                                      ("train/learning_rate", "lr", {"rel": 1e-6})):
        assert [s for s, _ in values[key]] == STEPS, key
        assert [v for _, v in values[key]] == pytest.approx([r[jsonl_key] for r in steps], **tolerance), key


def only(pattern: str) -> Path:
    found = glob.glob(pattern)
    assert len(found) == 1, (pattern, found)
    return Path(found[0])


@pytest.mark.parametrize("stage", list(STAGE_ARGS))
def test_tensorboard_holds_every_logged_step(tmp_path, tiny_llama_dir, stage):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = train(tmp_path, tiny_llama_dir, stage, "tensorboard")
    events = EventAccumulator(str(only(f"{tmp_path}/out/runs/*/events.out.tfevents.*").parent))
    events.Reload()
    assert_logged({t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]}, steps)


def test_wandb_offline_run_holds_the_history(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))  # the run: tmp_path/wandb/offline-run-*
    for var in ("CONFIG_DIR", "CACHE_DIR", "DATA_DIR", "ARTIFACT_DIR"):  # instead of ~/.config and ~/.cache
        monkeypatch.setenv(f"WANDB_{var}", str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_PROJECT", "lmforge-test")
    import wandb

    try:
        steps = train(tmp_path, tiny_llama_dir, "sft", "wandb")
    finally:
        wandb.finish()  # the CLI's process exit does this: transformers' WandbCallback leaves the run open
        wandb.teardown()  # and stops the wandb-core service
    run_file = only(f"{tmp_path}/wandb/offline-run-*/run-*.wandb")
    inspect = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_file)],
                             capture_output=True, text=True, check=True)
    records = [json.loads(line) for line in inspect.stdout.splitlines() if line.startswith("{")]
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    rows = [h for h in history if "train/loss" in h]
    assert_logged({k: [(h["train/global_step"], h[k]) for h in rows] for k in ("train/loss", "train/learning_rate")},
                  steps)


def test_swanlab_offline_run_holds_the_metrics(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("SWANLAB_MODE", "offline")  # local mode would also need swanboard (swanlab[dashboard])
    monkeypatch.setenv("SWANLAB_LOG_DIR", str(tmp_path / "swanlog"))
    monkeypatch.setenv("SWANLAB_SAVE_DIR", str(tmp_path / "swanlab-home"))  # read on import, instead of ~/.swanlab
    monkeypatch.setenv("SWANLAB_PROJECT", "lmforge-test")
    import swanlab
    from swanlab.data.porter.datastore import DataStore  # the reader `swanlab sync` uploads an offline run with

    try:
        steps = train(tmp_path, tiny_llama_dir, "sft", "swanlab")
    finally:
        if swanlab.get_run() is not None:  # as for wandb, the CLI's process exit does this
            swanlab.finish()
    store = DataStore()
    store.open_for_scan(str(only(f"{tmp_path}/swanlog/run-*/backup.swanlab")))
    records = [json.loads(line) for line in store]
    values: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        if record["model_type"] == "Scalar":
            scalar = record["data"]
            values.setdefault(scalar["key"], []).append((scalar["step"], scalar["metric"]["data"]))
    assert_logged(values, steps)
