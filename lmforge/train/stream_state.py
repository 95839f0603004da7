"""Where a streamed training set stands, saved in every checkpoint (one file per process), so that a resume
continues each process's stream right after the last trained batch, in the same epoch, instead of re-reading
and skipping every batch already trained.

The loader reads ahead of training (accelerate looks one batch ahead, the Trainer fetches a whole accumulation
group), so the state rides in each batch and is committed only when the optimizer step that used it is done.
Read in this process (dataloader_num_workers 0), the state is `datasets.IterableDataset.state_dict()` taken as
the batch is collated. Read by worker processes, each holding its own part of the stream, it is the state of a
torchdata `StatefulDataLoader` (every worker's stream position and whose turn is next) as the batch arrives.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, Callable, Iterator

import datasets
from accelerate.data_loader import IterableDatasetShard
from transformers import TrainerCallback

logger = logging.getLogger(__name__)
STATE_KEY = "_lmforge_stream_state"  # carried by each batch from the collator to the training step
FORMAT = 1  # "dataset": the stream's own state; "loader" (with workers): the StatefulDataLoader's


def state_file(checkpoint: str | Path, rank: int) -> Path:
    """The file holding process `rank`'s stream position inside a checkpoint folder."""
    return Path(checkpoint) / f"stream_state_{rank}.json"


def stream_source(loader: Any) -> datasets.IterableDataset | None:
    """The `datasets` stream this process's prepared loader reads: the loader's own dataset (one shard of the
    stream per process) or the one inside accelerate's per-process slicing (fewer shards than processes)."""
    dataset = getattr(loader, "dataset", None)
    if isinstance(dataset, IterableDatasetShard):
        dataset = dataset.dataset
    return dataset if isinstance(dataset, datasets.IterableDataset) else None


class StreamPosition(TrainerCallback):
    """The training stream's position at the last optimizer step, and its restoration on resume.

    Each batch carries the stream state from when it was collated; `handed_out` takes it off as the Trainer
    takes the batch for training, and `on_step_end` commits the newest one: what the next checkpoint saves.
    """

    def __init__(self, trainer: Any):
        self.trainer = trainer
        self.source: datasets.IterableDataset | None = None
        self.loader: Any = None  # the prepared loader, when worker processes read the stream (a StatefulDataLoader)
        self.workers = 0
        self.skip = 0  # batches to read and drop before training (a resume without a saved position, workers)
        self.epoch = 0  # the stream's epoch, and how many of its batches went to training
        self.batches = 0
        self.latest: dict[str, Any] | None = None  # stream state after the newest batch handed to training
        self.committed: dict[str, Any] | None = None  # the position at the last optimizer step
        self.reload_rng: str | None = None  # checkpoint whose RNG state applies once the stream restarted

    @staticmethod
    def trackable(dataset: Any, args: Any, dispatch_batches: bool | None) -> bool:
        """Whether `dataset` is a stream whose position can be saved (a warning says why not, for a stream)."""
        if not isinstance(dataset, datasets.IterableDataset):
            return False
        why = "accelerate dispatches its batches from process 0" if dispatch_batches is not False else None
        if why is None and args.dataloader_num_workers > 0:
            try:
                import torchdata.stateful_dataloader  # noqa: F401
            except ImportError:
                why = "dataloader_num_workers > 0 needs torchdata's StatefulDataLoader (pip install torchdata)"
        if why and args.save_strategy != "no":
            logger.warning("streaming: %s, so checkpoints hold no stream position and a resume re-reads and skips "
                           "the batches already trained", why)
        return why is None

    def marking(self, collate: Callable[[list[Any]], Any]) -> Callable[[list[Any]], Any]:
        """`collate` that adds the stream's state to each batch it builds (the state after the batch's rows)."""
        def collate_and_mark(rows: list[Any]) -> Any:
            batch = collate(rows)
            if self.source is not None and isinstance(batch, dict):
                batch[STATE_KEY] = self.source.state_dict()
            return batch

        return collate_and_mark

    def marked(self, batches: Iterator[Any]) -> Iterator[Any]:
        """`batches` of a StatefulDataLoader, each carrying the loader's state after it (and the stream's epoch),
        after dropping the `skip` batches a resume without a saved position reads again."""
        for _ in range(self.skip):
            if next(batches, None) is None:
                break
        self.skip = 0
        for batch in batches:
            if isinstance(batch, MutableMapping):
                batch[STATE_KEY] = {"epoch": self.loader.iteration, "loader": copy.deepcopy(self.loader.state_dict())}
            yield batch

    def attach(self, loader: Any, workers: int = 0) -> None:
        """Follow the stream `loader` reads (a new loader per `train()` call); with `workers` > 0 it is a
        StatefulDataLoader whose own state is the position."""
        self.source = stream_source(loader)
        self.loader, self.workers = (loader, workers) if workers and self.source is not None else (None, 0)
        self.epoch, self.batches, self.latest, self.committed, self.reload_rng = 0, 0, None, None, None
        self.skip = 0

    def handed_out(self, batches: list[Any]) -> None:
        """Batches the Trainer takes for training (one accumulation group, or the stream's last few)."""
        for batch in batches:
            state = batch.pop(STATE_KEY, None) if isinstance(batch, dict) else None
            if state is None:
                continue
            if state["epoch"] != self.epoch:  # the Trainer began a new pass over the stream
                self.epoch, self.batches = state["epoch"], 0
            self.batches += 1
            self.latest = state
        if self.reload_rng is not None:
            # restarting the stream drew from the RNG; the uninterrupted run went on without drawing
            self.trainer._load_rng_state(self.reload_rng)
            self.reload_rng = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.latest is None:
            return
        where = {"loader": self.latest["loader"], "workers": self.workers} if self.loader is not None else {
            "dataset": self.latest}
        self.committed = {"epoch": self.epoch, "batches_in_epoch": self.batches, **where,
                          "exhausted": self.trainer.accelerator.gradient_state.end_of_dataloader}
        # the Trainer counts batches from where this process resumed; the stream knows where its epoch began
        state.epoch = self.epoch + self.batches / (state.max_steps * args.gradient_accumulation_steps)

    def save(self, checkpoint: Path, rank: int, world_size: int) -> None:
        """Write this process's committed position into a (staged) checkpoint folder."""
        if self.source is None or self.committed is None:
            return
        checkpoint.mkdir(parents=True, exist_ok=True)
        record = {"format": FORMAT, "world_size": world_size, **self.committed}
        state_file(checkpoint, rank).write_text(json.dumps(record) + "\n")

    def resume(self, checkpoint: str | None, rank: int, world_size: int,
               trainer_start: tuple[int, int]) -> tuple[int, int]:
        """(epoch to start in, batches the Trainer should skip in it): from the saved position, where there
        is one, else the Trainer's own `trainer_start` (skipping every batch trained in that epoch)."""
        saved = self._read(checkpoint, rank, world_size, trainer_start[1]) if checkpoint else None
        if saved is None:
            self.epoch, self.batches = trainer_start
            if self.loader is None:
                return trainer_start
            self.skip = trainer_start[1]  # read again through the stateful loader, so its state stays its own
            return trainer_start[0], 0
        if saved["exhausted"]:  # the last trained batch ended its epoch: the next epoch starts afresh
            self.epoch, self.batches = saved["epoch"] + 1, 0
        else:
            if self.loader is not None:
                self.loader.load_state_dict(saved["loader"])
            else:
                self.source.load_state_dict(saved["dataset"])
            self.epoch, self.batches = saved["epoch"], saved["batches_in_epoch"]
            self.reload_rng = checkpoint
        logger.info("resuming the stream at epoch %d after its batch %d (nothing re-read)", self.epoch, self.batches)
        return self.epoch, 0

    def _read(self, checkpoint: str, rank: int, world_size: int, skipped: int) -> dict[str, Any] | None:
        """The saved position, or None (with a warning saying what the resume does instead)."""
        path = state_file(checkpoint, rank)
        saved = json.loads(path.read_text()) if path.is_file() else None
        why = None
        if saved is None:
            why = "holds no stream position (written by an older lmforge, or while it could not be saved)"
        elif saved.get("world_size") != world_size or saved.get("format") != FORMAT:
            why = f"holds the stream positions of {saved.get('world_size')} processes"
        elif saved.get("workers", 0) != self.workers and not saved["exhausted"]:
            why = (f"holds the stream position of {saved.get('workers', 0)} loader workers, and "
                   f"dataloader_num_workers is {self.workers}")
        if why is None:
            return saved
        logger.warning("%s %s: re-reading and skipping the %d batches already trained in this epoch; a stream "
                       "that had wrapped into a new epoch does not continue exactly", checkpoint, why, skipped)
        return None
