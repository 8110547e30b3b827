"""Files that appear under their final name only when complete: written beside it, flushed, then renamed.

Every writer of results, manifests, pointers and checkpoints goes through here, so a process killed mid-write
leaves the previous file (or none), never a truncated one.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator


def partial_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place (hidden, unique to this process)."""
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


@contextmanager
def open_atomic(path: str | Path, fsync: bool = False) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through, renamed into place when the block ends without an error (for
    writers that stream, e.g. ``np.save`` of a large array, rather than hold a second copy as bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: str | Path, data: bytes, fsync: bool = False) -> Path:
    with open_atomic(path, fsync) as f:
        f.write(data)
    return Path(path)


def write_text(path: str | Path, text: str, fsync: bool = False) -> Path:
    return write_bytes(path, text.encode("utf-8"), fsync=fsync)
