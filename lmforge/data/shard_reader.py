"""Reading stage pt's token shards (written by lmforge/data/shards.py) for training: blocks of cutoff_len
tokens cut from memory maps on demand, with val_size held out without a scan."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Sampler

from lmforge.data.shards import MANIFEST, make_job, read_manifest, refuse_other_tokenizer
from lmforge.errors import LmforgeError


@dataclass(frozen=True)
class Holdout:
    """val_size without a scan: of `total` blocks, every `stride`-th (the last of each group of stride) is held
    out for eval, `held` of them; the others train, in order. Both maps are O(1)."""

    total: int
    held: int

    @property
    def stride(self) -> int:
        return self.total // self.held if self.held else 0

    def train_block(self, j: int) -> int:
        if not self.held:
            return j
        group, rest = divmod(j, self.stride - 1)
        return group * self.stride + rest if group < self.held else j + self.held

    def eval_block(self, k: int) -> int:
        return k * self.stride + self.stride - 1


class TokenBlocks:
    """Map-style dataset of `block_size`-token blocks cut from a split's shards, read from memory maps on demand.

    Item i is {input_ids, attention_mask, labels} as lists, as stage pt's Arrow rows are; a block may span two
    shards. Only the shards' token counts are held; at most MAX_OPEN shards are mapped at a time (each map keeps a
    file descriptor). The maps are not pickled, so DataLoader workers open their own.
    """

    MAX_OPEN = 64
    column_names = ["input_ids", "attention_mask", "labels"]

    def __init__(self, folder: Path, shards: list[dict[str, Any]], dtype: str, block_size: int,
                 count: int, block_of: Callable[[int], int]):
        self.folder, self.files, self.dtype, self.block_size = folder, [s["file"] for s in shards], dtype, block_size
        self.offsets = np.cumsum([0] + [s["tokens"] for s in shards])  # first token of each shard
        self.count, self.block_of = count, block_of
        self._maps: OrderedDict[int, np.memmap] = OrderedDict()

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        if not -self.count <= i < self.count:
            raise IndexError(f"block {i} of {self.count}")
        start = self.block_of(i % self.count) * self.block_size
        ids = self.tokens(start, start + self.block_size).tolist()
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids}

    def tokens(self, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) of the split's stream, as int64."""
        parts = []
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while start < end:
            first = int(self.offsets[shard])
            stop = min(end, int(self.offsets[shard + 1]))
            parts.append(self._map(shard)[start - first:stop - first])
            start, shard = stop, shard + 1
        return np.concatenate(parts).astype(np.int64)

    def _map(self, shard: int) -> np.memmap:
        if shard in self._maps:
            self._maps.move_to_end(shard)
        else:
            while len(self._maps) >= self.MAX_OPEN:
                self._maps.popitem(last=False)
            self._maps[shard] = np.memmap(self.folder / self.files[shard], dtype=self.dtype, mode="r")
        return self._maps[shard]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": OrderedDict()}


class BlockOrder(Sampler[int]):
    """The training order of the blocks: the permutation accelerate's SeedableRandomSampler draws (randperm
    seeded with data seed + epoch, the same on every process), without its list. RandomSampler turns the
    permutation into a Python list, 36 bytes a block (100 MB for the 2.8M blocks of 5 GB of text); this keeps
    the int64 tensor (8 bytes a block) and hands it out a chunk at a time."""

    CHUNK = 1 << 16

    def __init__(self, count: int, data_seed: int | None):
        self.count = count
        self.initial_seed = data_seed if data_seed is not None else torch.random.initial_seed()
        self.epoch = 0

    def __len__(self) -> int:
        return self.count

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Any:
        generator = torch.Generator()
        generator.manual_seed(self.initial_seed + self.epoch)
        order = torch.randperm(self.count, generator=generator)
        for part in order.split(self.CHUNK):
            yield from part.tolist()
        self.epoch += 1


def open_blocks(path: Path, tokenizer: Any, block_size: int, val_size: float) -> tuple[TokenBlocks, TokenBlocks | None,
                                                                                        dict[str, Any]]:
    """(train, eval, manifest) blocks of a finished shard folder; eval is the validation split, else val_size of
    the train blocks held out evenly (see `Holdout`). Reads the manifest and the shards' sizes, no tokens."""
    manifest = read_manifest(path)
    if manifest is None:
        raise LmforgeError(f"{path} holds unfinished token shards (no {MANIFEST}): run `lmforge preprocess` with the "
                           "same options again to finish them")
    refuse_other_tokenizer(manifest, make_job(tokenizer), path)
    for split, shards in manifest["splits"].items():
        for shard in shards:
            size = (path / split / shard["file"]).stat().st_size if (path / split / shard["file"]).is_file() else -1
            if size != shard["bytes"]:
                raise LmforgeError(f"{path / split / shard['file']}: {max(size, 0)} bytes, the manifest says "
                                   f"{shard['bytes']}: run `lmforge preprocess` again")
    total = sum(s["tokens"] for s in manifest["splits"]["train"]) // block_size
    held = _held_out(val_size, total) if "validation" not in manifest["splits"] else 0
    holdout = Holdout(total, held)
    make = lambda split, count, block_of: TokenBlocks(path / split, manifest["splits"][split], manifest["dtype"],  # noqa: E731
                                                      block_size, count, block_of)
    train = make("train", total - held, holdout.train_block)
    if "validation" in manifest["splits"]:
        n_eval = sum(s["tokens"] for s in manifest["splits"]["validation"]) // block_size
        return train, make("validation", n_eval, Holdout(n_eval, 0).train_block), manifest  # picklable identity
    return train, make("train", held, holdout.eval_block) if held else None, manifest


def _held_out(val_size: float, total: int) -> int:
    if not val_size:
        return 0
    held = int(val_size) if val_size >= 1 else int(val_size * total)
    if not 1 <= held <= total // 2:
        raise LmforgeError(f"val_size {val_size} holds out {held} of {total} blocks of the token shards; it must "
                           "hold out at least 1 and at most half: change val_size or cutoff_len")
    return held
