"""Callbacks: `trainer_log.jsonl` and a progress bar that shows loss and tokens/s."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import Any, Iterator

from tqdm.auto import tqdm
from transformers import TrainerCallback

from lmforge.errors import LmforgeError

LOG_NAME = "trainer_log.jsonl"


def read_log(output_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's JSONL trainer log, or none when it has no log."""
    path = Path(output_dir) / LOG_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class JsonlLogCallback(TrainerCallback):
    """One JSON object per log: step, loss, lr, grad_norm, tokens_per_second, elapsed_s (and eval)."""

    def __init__(self, output_dir: str):
        self.path = Path(output_dir) / LOG_NAME

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not self.path.is_file():
            return
        # Resuming: keep the records up to the checkpoint's step, so no step appears twice.
        kept = [r for r in read_log(self.path.parent) if r.get("step", 0) <= state.global_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        record: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        renames = {"learning_rate": "lr"}
        for key, value in logs.items():
            record[renames.get(key, key)] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


class ProgressCallback(TrainerCallback):
    """A tqdm bar over optimizer steps with the latest loss, tokens/s and learning rate."""

    def __init__(self) -> None:
        self.bar: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="Training", dynamic_ncols=True)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if self.bar is None or not logs:
            return
        if "loss" in logs:
            shown = {"loss": f"{logs['loss']:.4f}", "lr": f"{logs.get('learning_rate', 0):.2e}"}
            if "tokens_per_second" in logs:  # lmforge's collators count real tokens; TRL's do not
                shown["tok_s"] = f"{logs['tokens_per_second']:.0f}"
            if "reward" in logs:  # grpo
                shown["reward"] = f"{logs['reward']:.3f}"
            self.bar.set_postfix(shown)
        if "eval_loss" in logs:
            self.bar.write(f"step {state.global_step}: eval_loss {logs['eval_loss']:.4f}")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class TrainingStopped(LmforgeError):
    """A run stopped on request after saving a checkpoint; the CLI exits 128 + signal number."""

    def __init__(self, signum: int, step: int, output_dir: str):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; a checkpoint was saved in "
                         f"{output_dir}: run the same command again to resume (resume_from_checkpoint: auto)")


class StopOnSignal(TrainerCallback):
    """SIGTERM or a first ctrl-C: finish the optimizer step, save a checkpoint, stop.
    A second ctrl-C stops at once."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\nlmforge: {signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
              "(ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in previous:
            signal.signal(s, self._handle)
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        agreed = agreed_signal(self.signal, args.device)
        if agreed is not None:
            self.signal = self.signal or agreed
            control.should_save = True
            control.should_training_stop = True


def agreed_signal(signum: int | None, device: Any) -> int | None:
    """The signal any rank received, the same on every rank: each rank sees SIGTERM on its own, and ranks that
    started saving at different steps would deadlock in the save's collectives. One tiny all-reduce per
    optimizer step, in distributed runs only."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return signum
    flag = torch.tensor([signum or 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) or None
