"""Pack tokenized examples into rows of at most `cutoff_len` tokens, without contamination.

Packing is best-fit-decreasing. A packed row keeps the length of each example (`lengths`), from which
the collator builds per-example `position_ids` and a block-diagonal causal mask, so no example
attends to another. The first label of every example is masked: unpacked, nothing predicts an
example's first token, so the packed loss equals the unpacked one exactly.
"""

from __future__ import annotations

import bisect
from typing import Any

import datasets

from lmforge.data.processors import IGNORE_INDEX


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of example indices; each item goes to the fullest bin it still fits in.

    Free space values are kept in a sorted list with a stack of bins per value, so each placement
    costs O(log capacity) lookups rather than a scan over bins.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    bins: list[list[int]] = []
    free_values: list[int] = []  # sorted distinct free-space values that have bins
    by_free: dict[int, list[int]] = {}
    for i in order:
        size = lengths[i]
        if size > capacity:
            raise ValueError(f"example {i} has {size} tokens, more than the pack size {capacity}")
        pos = bisect.bisect_left(free_values, size)
        if pos < len(free_values):
            free = free_values[pos]
            b = by_free[free].pop()
            if not by_free[free]:
                del by_free[free]
                free_values.pop(pos)
        else:
            b, free = len(bins), capacity
            bins.append([])
        bins[b].append(i)
        remaining = free - size
        if remaining > 0:
            if remaining not in by_free:
                by_free[remaining] = []
                bisect.insort(free_values, remaining)
            by_free[remaining].append(b)
    return bins


def _pack_rows(batch: dict[str, list[Any]], bins: list[list[int]]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "lengths": []}
    for members in bins:
        ids, labels, lengths = [], [], []
        for i in members:
            ids += batch["input_ids"][i]
            labels += [IGNORE_INDEX] + list(batch["labels"][i][1:])
            lengths.append(len(batch["input_ids"][i]))
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["lengths"].append(lengths)
    return out


def pack_dataset(ds: datasets.Dataset, capacity: int, seed: int) -> tuple[datasets.Dataset, float]:
    """(packed dataset with input_ids, labels, lengths; packing efficiency = tokens / slots)."""
    lengths = [len(x) for x in ds["input_ids"]]
    bins = best_fit_decreasing(lengths, capacity)
    columns = ds.select_columns(["input_ids", "labels"]).to_dict()
    packed = datasets.Dataset.from_dict(_pack_rows(columns, bins)).shuffle(seed=seed).flatten_indices()
    efficiency = sum(lengths) / (len(bins) * capacity) if bins else 0.0
    return packed, efficiency
