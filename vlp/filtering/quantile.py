"""Exact order statistics of a stream of float32 scores, in memory that does not grow with the pool.

``score_top=0.3`` needs one value of the pool's sorted scores: the cut. Sorting 10^9 scores takes 4 GB before the
sort's own copies; selecting by radix takes two reads of the score column and 2 x 65,536 counters. A float32's bits,
reordered so that unsigned order equals numeric order, make a 32-bit key (:func:`sort_keys`). Pass 1 counts the
high 16 bits of every key, which tells which of the 65,536 bins holds the value of a given rank and its rank inside
that bin; pass 2 counts the low 16 bits of the keys in that bin only, which gives the key itself. The answer is the
value a full sort would put at that rank, bit for bit: no bin width, no rounding, no assumption that scores lie in
[-1, 1].
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

BINS = 1 << 16


def sort_keys(values: np.ndarray) -> np.ndarray:
    """uint32 keys whose unsigned order is the numeric order of the float32 values (NaN must be removed first)."""
    # -0.0 + 0.0 is +0.0: the two zeros compare equal, so they must share a key.
    bits = (np.asarray(values, dtype=np.float32) + np.float32(0.0)).view(np.uint32)
    negative = (bits >> np.uint32(31)).astype(bool)
    # Negative floats order backwards by their bits, so flip them all; set the sign bit of positives to put them above.
    return np.where(negative, ~bits, bits | np.uint32(0x80000000))


def from_key(key: int) -> np.float32:
    key = np.uint32(key)
    bits = key & np.uint32(0x7FFFFFFF) if key & np.uint32(0x80000000) else ~key
    return np.array([bits], dtype=np.uint32).view(np.float32)[0]


def count_high(batches: Iterable[np.ndarray]) -> np.ndarray:
    """Pass 1: how many values fall in each of the 65,536 bins of the high 16 key bits."""
    counts = np.zeros(BINS, dtype=np.int64)
    for values in batches:
        if len(values):
            counts += np.bincount(sort_keys(values) >> np.uint32(16), minlength=BINS)
    return counts


def values_at(batches: Iterable[np.ndarray], high: np.ndarray, ranks: list[int]) -> list[np.float32]:
    """Pass 2: the values at ascending 0-based ``ranks`` of the stream that :func:`count_high` counted as ``high``.

    ``batches`` must yield the same values as in pass 1 (in any order or batching)."""
    total = int(high.sum())
    for rank in ranks:
        if not 0 <= rank < total:
            raise ValueError(f"rank {rank} outside the {total} values counted")
    cumulative = np.cumsum(high)
    # per rank: its bin, and its rank among the values of that bin
    located = []
    for rank in ranks:
        b = int(np.searchsorted(cumulative, rank, side="right"))
        located.append((b, rank - (int(cumulative[b - 1]) if b else 0)))
    low = {b: np.zeros(BINS, dtype=np.int64) for b, _ in located}
    wanted = np.array(sorted(low), dtype=np.uint32)
    for values in batches:
        if not len(values):
            continue
        keys = sort_keys(values)
        high_bits = keys >> np.uint32(16)
        inside = np.isin(high_bits, wanted)
        if not inside.any():
            continue
        keys, high_bits = keys[inside], high_bits[inside]
        for b in low:
            low[b] += np.bincount(keys[high_bits == b] & np.uint32(0xFFFF), minlength=BINS)
    out = []
    for b, within in located:
        counted = int(low[b].sum())
        if counted != int(high[b]):
            raise RuntimeError(f"the second read of the scores differs from the first: bin {b} holds {counted} "
                               f"values, {int(high[b])} before (were the tables changed while filtering?)")
        l_bits = int(np.searchsorted(np.cumsum(low[b]), within, side="right"))
        out.append(from_key((b << 16) | l_bits))
    return out
