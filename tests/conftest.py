"""Shared fixtures: the real data folder, and small fabricated shard sets (good and broken)."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def require_shared_data(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (the tests read ../shared/data next to the repo)")
    return path


def jpeg_bytes(seed: int, size: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90)
    return out.getvalue()


def write_tar(path: Path, samples: list[dict]) -> None:
    """A tar written with Python's tarfile (the writer open_clip's pipeline trips over on webdataset 1.x)."""
    with tarfile.open(path, "w") as tf:
        for sample in samples:
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def make_sample(key: str, seed: int, text: str | None = None, **meta) -> dict:
    sample = {"__key__": key, "jpg": jpeg_bytes(seed)}
    sample["txt"] = (text if text is not None else f"caption {key}").encode()
    sample["json"] = json.dumps({"uid": f"{seed:032x}", **meta}).encode()
    return sample


def make_shard_set(root: Path, sizes: list[int], prefix: str = "", manifest: bool = True, **meta) -> list[str]:
    """Shards with the given sample counts; uid = running index (as 32 hex chars). Returns all uids."""
    root.mkdir(parents=True, exist_ok=True)
    uids, records, n = [], [], 0
    for i, size in enumerate(sizes):
        samples = []
        for _ in range(size):
            samples.append(make_sample(f"{prefix}s{n:06d}", n, **meta))
            uids.append(f"{n:032x}")
            n += 1
        path = root / f"{prefix}{i:05d}.tar"
        write_tar(path, samples)
        records.append({"name": path.name, "samples": size, "bytes": path.stat().st_size})
    if manifest:
        (root / "manifest.json").write_text(json.dumps({"shards": records, "samples": n}))
    return uids
