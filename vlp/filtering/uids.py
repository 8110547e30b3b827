"""DataComp's uid files: a sorted ``.npy`` of 128-bit uids, each stored as two unsigned 64-bit halves.

DataComp's resharder loads the file with ``np.load``, expects the structured dtype ``u8,u8`` sorted ascending, and
looks each pool uid up by splitting its 32 hex digits into two integers. vlp writes exactly that, so a selection made
here can be resharded by DataComp's tools and the other way round.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from vlp.atomic import open_atomic

DTYPE = np.dtype("u8,u8")


def uid_pair(uid: str) -> tuple[int, int]:
    """32 hex digits -> (high, low) 64-bit halves; an error naming the uid otherwise."""
    if not isinstance(uid, str) or len(uid) != 32:
        raise ValueError(f"uid {uid!r} is not 32 hex digits")
    try:
        return int(uid[:16], 16), int(uid[16:], 16)
    except ValueError:
        raise ValueError(f"uid {uid!r} is not 32 hex digits") from None


def to_array(uids: Iterable[str]) -> np.ndarray:
    """The sorted, duplicate-free uid array of DataComp's format."""
    return sorted_unique(to_array_unsorted(uids))


def to_hex(array: np.ndarray) -> list[str]:
    return [f"{int(hi):016x}{int(lo):016x}" for hi, lo in zip(array["f0"], array["f1"])]


def sorted_unique(array: np.ndarray) -> np.ndarray:
    """A uid array sorted by (high, low) without repeats. ``np.lexsort`` on the two halves: an index of 8 bytes per
    uid and one sorted copy, where ``np.unique`` on the structured dtype holds several copies and compares slowly."""
    order = np.lexsort((array["f1"], array["f0"]))
    array = array[order]
    del order
    if len(array) > 1:
        new = np.ones(len(array), dtype=bool)
        new[1:] = (array["f0"][1:] != array["f0"][:-1]) | (array["f1"][1:] != array["f1"][:-1])
        if not new.all():
            array = array[new]
    return array


def write_uids(path: str | Path, uids: Iterable[str] | np.ndarray) -> int:
    """Write a uid file atomically, streamed to disk; returns the number of distinct uids written."""
    array = uids if isinstance(uids, np.ndarray) and uids.dtype == DTYPE else to_array_unsorted(uids)
    array = sorted_unique(array)
    with open_atomic(path, fsync=True) as f:
        np.save(f, array)
    return len(array)


def read_uids(path: str | Path) -> np.ndarray:
    """A uid file as written by vlp or DataComp; errors name the file."""
    array = np.load(path)
    if array.dtype != DTYPE:
        raise ValueError(f"{path}: dtype {array.dtype}, expected DataComp's uid dtype {DTYPE} (two uint64 halves)")
    hi, lo = array["f0"], array["f1"]
    if len(array) > 1 and not np.all((hi[1:] > hi[:-1]) | ((hi[1:] == hi[:-1]) & (lo[1:] > lo[:-1]))):
        raise ValueError(f"{path}: uids are not sorted ascending without repeats, as DataComp's lookup requires")
    return array


def contains(array: np.ndarray, uids: Iterable[str]) -> np.ndarray:
    """For each uid, whether the sorted uid array holds it (binary search, as DataComp's resharder does)."""
    query = to_array_unsorted(uids)
    where = np.searchsorted(array, query)
    found = np.zeros(len(query), dtype=bool)
    inside = where < len(array)
    found[inside] = array[where[inside]] == query[inside]
    return found


def to_array_unsorted(uids: Iterable[str]) -> np.ndarray:
    """The uids in the given order, in DataComp's dtype."""
    pairs = np.array([uid_pair(u) for u in uids], dtype=np.uint64).reshape(-1, 2)
    array = np.empty(len(pairs), dtype=DTYPE)
    array["f0"], array["f1"] = pairs[:, 0], pairs[:, 1]
    return array


def from_arrow(uids, where: str) -> np.ndarray:
    """A pyarrow string array of 32-hex-digit uids -> DataComp's ``u8,u8`` (high, low) pairs, vectorised over the
    array's buffers (a parquet column of millions converts in milliseconds); errors name ``where``."""
    import pyarrow as pa

    if pa.types.is_large_string(uids.type):
        uids = uids.cast(pa.string())
    n = len(uids)
    if uids.null_count:
        raise ValueError(f"{where}: {uids.null_count} rows without a uid")
    if n == 0:
        return np.empty(0, dtype=DTYPE)
    offsets = np.frombuffer(uids.buffers()[1], dtype=np.int32, count=n + 1, offset=4 * uids.offset)
    lengths = np.diff(offsets)
    if (lengths != 32).any():
        bad = uids[int(np.argmax(lengths != 32))].as_py()
        raise ValueError(f"{where}: uid {bad!r} is not 32 hex digits")
    data = np.frombuffer(uids.buffers()[2], dtype=np.uint8, count=32 * n, offset=int(offsets[0])).reshape(n, 32)
    nibbles = _HEX[data]
    if (nibbles == 255).any():
        bad = uids[int(np.argmax((nibbles == 255).any(axis=1)))].as_py()
        raise ValueError(f"{where}: uid {bad!r} is not 32 hex digits")
    halves = np.ascontiguousarray((nibbles[:, 0::2] << 4) | nibbles[:, 1::2]).view(">u8")
    out = np.empty(n, dtype=DTYPE)
    out["f0"], out["f1"] = halves[:, 0], halves[:, 1]
    return out


_HEX = np.full(256, 255, dtype=np.uint8)
_HEX[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16)
_HEX[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)
