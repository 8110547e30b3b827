"""Files that appear under their final name only when complete: written beside it, flushed, then renamed.

Every writer of results, manifests, pointers and checkpoints goes through here, so a process killed mid-write
leaves the previous file (or none), never a truncated one.
"""
from __future__ import annotations

import os
from pathlib import Path


def partial_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place (hidden, unique to this process)."""
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


def write_bytes(path: str | Path, data: bytes, fsync: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_text(path: str | Path, text: str, fsync: bool = False) -> Path:
    return write_bytes(path, text.encode("utf-8"), fsync=fsync)
