"""Embeddings, computed once per (model, image set) and reused by every task of a suite and by later runs.

The cache key hashes the model's identity (for open_clip models a hash of every weight tensor), the image set's
fingerprint (files with sizes and modification times, subset options) and the preprocessing (input size,
normalisation, decode mode): a different model, checkpoint, dataset or transform never reads stale features.
Entries are written to a temporary name and renamed, so an interrupted run leaves no half entry behind.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vlp import atomic
from vlp.eval.images import ImageSet, LoadOptions, batch_count
from vlp.eval.models import EvalModel

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the stored layout or the meaning of a feature changes


def default_cache_dir() -> Path:
    base = os.environ.get("VLP_CACHE_DIR")
    return (Path(base) if base else Path.home() / ".cache" / "vlp") / "eval"


@dataclass
class Embedded:
    """An embedded image set, in key order: ``features[i]`` is the model's raw (unnormalised) embedding of the
    image described by ``records[i]``."""
    features: torch.Tensor
    records: list[dict]
    skipped: dict = field(default_factory=dict)
    seconds: float = 0.0
    cached: bool = False

    def column(self, name: str) -> list:
        return [r.get(name) for r in self.records]


@dataclass
class FeatureOptions:
    load: LoadOptions = field(default_factory=LoadOptions)
    cache_dir: Path | None = None  # None: no disk cache (features still shared within a run)
    progress: bool = True


def _key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:40]


def unread(size: int, skipped: dict) -> str:
    """Why an image set gave no image: it holds none of a supported type, or its images failed to decode (or
    both, or other reasons), with the counts."""
    no_image, decode = skipped.get("no_image", 0), skipped.get("image_decode", 0)
    other = {k: v for k, v in skipped.items() if k not in ("no_image", "image_decode") and v}
    if not skipped:
        return f"it lists {size} images and gave none" if size else "it holds no file of a supported type"
    parts = []
    if no_image:
        parts.append(f"{no_image} samples hold no file of a supported type")
    if decode:
        parts.append(f"{decode} samples hold an image that failed to decode")
    if other:
        parts.append(", ".join(f"{n} skipped as {reason}" for reason, n in sorted(other.items())))
    return "; ".join(parts)


class FeatureStore:
    def __init__(self, model: EvalModel, opts: FeatureOptions | None = None):
        self.model = model
        self.opts = opts or FeatureOptions()
        self._memory: dict[str, object] = {}
        self.computed: list[str] = []  # names of the image sets embedded by this store (not read from cache)

    # -- images ----------------------------------------------------------------------------------------
    def image_key(self, images: ImageSet) -> str:
        return _key({"v": CACHE_VERSION, "model": self.model.identity, "images": images.fingerprint(),
                     "preprocess": asdict(self.model.preprocess), "fast_decode": self.opts.load.fast_decode})

    def images(self, images: ImageSet) -> Embedded:
        key = self.image_key(images)
        if key in self._memory:
            return self._memory[key]
        path = self.opts.cache_dir / "images" / f"{key}.npz" if self.opts.cache_dir else None
        if path is not None and path.exists():
            with np.load(path) as stored:
                found = Embedded(torch.from_numpy(stored["features"]), json.loads(str(stored["records"])),
                                 json.loads(str(stored["skipped"])), cached=True)
            log.info("%s: %d cached embeddings from %s", images.name, len(found.records), path)
        else:
            found = self._embed(images)
            if path is not None:
                buffer = io.BytesIO()
                np.savez(buffer, features=found.features.numpy(), records=np.array(json.dumps(found.records)),
                         skipped=np.array(json.dumps(found.skipped)))
                atomic.write_bytes(path, buffer.getvalue())
        self._memory[key] = found
        return found

    def _embed(self, images: ImageSet) -> Embedded:
        start = time.time()
        load = self.opts.load
        features, records = [], []
        bar = tqdm(images.batches(self.model.preprocess, load), total=batch_count(len(images), load.batch_size),
                   desc=f"embed {images.name}", unit="batch", disable=not self.opts.progress)
        with torch.no_grad():
            for batch, batch_records in bar:
                features.append(self.model.encode_image(batch).float())
                records.extend(batch_records)
        skipped = images.skipped()
        if not records:
            raise ValueError(f"{images.name}: no image could be read: {unread(len(images), skipped)}"
                             + (f"; the first: {images.first_failure()}" if skipped else ""))
        order = sorted(range(len(records)), key=lambda i: records[i]["key"])
        keys = [records[i]["key"] for i in order]
        repeated = next((a for a, b in zip(keys, keys[1:]) if a == b), None)
        if repeated is not None:
            raise ValueError(f"{images.name}: the key {repeated!r} names two samples; keys must be unique")
        stacked = torch.cat(features)[order].contiguous()
        stacked, ordered = images.finalize(stacked, [records[i] for i in order])
        if skipped:  # a figure on a silently smaller set would not be comparable with anyone else's
            raise ValueError(f"{images.name}: {sum(skipped.values())} samples could not be read ({skipped}); the "
                             f"first: {images.first_failure()}; an evaluation set must be read whole, fix or "
                             "rewrite it")
        self.computed.append(images.name)
        return Embedded(stacked, ordered, skipped, seconds=time.time() - start)

    # -- texts -----------------------------------------------------------------------------------------
    def texts(self, texts: list[str], desc: str = "texts") -> torch.Tensor:
        """Raw embeddings of ``texts`` through the model's ``encode_text``, in order; cached like images."""
        key = _key({"v": CACHE_VERSION, "model": self.model.identity, "texts": texts})
        if key in self._memory:
            return self._memory[key]
        path = self.opts.cache_dir / "texts" / f"{key}.npy" if self.opts.cache_dir else None
        if path is not None and path.exists():
            found = torch.from_numpy(np.load(path))
        else:
            size = self.opts.load.batch_size
            chunks = range(0, len(texts), size)
            out = []
            with torch.no_grad():
                for start in tqdm(chunks, desc=f"embed {desc}", unit="batch",
                                  disable=not self.opts.progress or len(chunks) < 2):
                    out.append(self.model.encode_text(texts[start:start + size]).float())
            found = torch.cat(out) if out else torch.zeros(0)
            if path is not None:
                buffer = io.BytesIO()
                np.save(buffer, found.numpy())
                atomic.write_bytes(path, buffer.getvalue())
        self._memory[key] = found
        return found
