"""Image sets: the images one evaluation embeds, with a record per image, read through vlp.data's eval transform.

Two kinds of source:
- :class:`FileImages`: image files listed up front (folders, caption files), decoded by DataLoader workers;
- :class:`ShardImages`: WebDataset shards (CLIP_benchmark's layout, vlp shards), streamed by
  :class:`vlp.data.ShardStream`.

Both decode with :class:`vlp.data.ImageDecoder` (open_clip's eval transform: resize the shorter side, bicubic, then
crop the centre; or squash) and normalise per batch with torchvision's arithmetic, so every format gives the same
pixels for the same image, and with ``fast_decode=False`` open_clip's tensors bit for bit (tests/test_eval_pixels.py).
A record is a plain dict (JSON-serialisable, it goes into the feature cache) with at least ``key``, unique within the
set; the set's canonical order is by key, whatever the number of workers.
"""
from __future__ import annotations

import hashlib
import math
import os
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import functional as TF

from vlp.data import BadSample, ImageDecoder, ImageOptions, Loader, ShardStream, StreamOptions
from vlp.data.shards import expand
from vlp.eval.models import Preprocess


@dataclass
class LoadOptions:
    batch_size: int = 256
    workers: int = 1
    fast_decode: bool = True  # JPEG DCT scaling (vlp.data's draft decode); False decodes every pixel, as open_clip


# Part of every image set's fingerprint, hence of the feature cache key: embeddings of other pixels are not reused.
PIXELS = "open_clip eval transform: rgb, resize shorter side + centre crop or squash, to_tensor + normalize"


def image_options(pre: Preprocess, fast_decode: bool) -> ImageOptions:
    return ImageOptions(size=pre.size, train=False, mean=pre.mean, std=pre.std, draft=fast_decode,
                        resize_mode=pre.resize_mode)


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 as open_clip's ``ToTensor`` + ``Normalize`` compute it (divide by 255, subtract,
    divide): vlp.data's one-multiply form differs from it by up to 2.4e-7."""
    return TF.normalize(images.float().div(255), mean, std)


class ImageSet(ABC):
    name: str

    @abstractmethod
    def fingerprint(self) -> dict:
        """What identifies the pixels and records (paths, sizes, modification times, options): part of the cache key."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def batches(self, pre: Preprocess, opts: LoadOptions) -> Iterator[tuple[torch.Tensor, list[dict]]]:
        """(normalised images (N, 3, H, W), one record per image), in any order."""

    def finalize(self, features: torch.Tensor, records: list[dict]) -> tuple[torch.Tensor, list[dict]]:
        """Post-process the embedded set (already in key order); e.g. merge samples that are one image."""
        return features, records

    def skipped(self) -> dict:
        return {}


def _stat_digest(paths: list[str]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


class _DecodeFiles(Dataset):
    def __init__(self, paths: list[str], opts: ImageOptions, digest: bool):
        self.paths, self.digest = paths, digest
        self.decoder = ImageDecoder(opts)
        self.rng = random.Random(0)  # the eval transform draws nothing; the decoder's signature wants one

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with open(self.paths[i], "rb") as f:
            data = f.read()
        # The content hash lets an evaluator recognise the same image under two names (query/gallery copies).
        digest = hashlib.md5(data).hexdigest() if self.digest else None
        try:
            return i, self.decoder(data, self.rng), digest
        except BadSample as e:
            raise ValueError(f"{self.paths[i]}: {e}") from e


class FileImages(ImageSet):
    """Image files with their records; ``digest=True`` adds each file's MD5 to its record."""

    def __init__(self, name: str, paths: list[str], records: list[dict], digest: bool = False,
                 extra: dict | None = None):
        if len(paths) != len(records):
            raise ValueError("one record per image path expected")
        self.name, self.paths, self.records, self.digest = name, paths, records, digest
        self.extra = extra or {}

    def fingerprint(self) -> dict:
        return {"kind": "files", "name": self.name, "files": _stat_digest(self.paths), "count": len(self.paths),
                "digest": self.digest, "records": _records_digest(self.records), "pixels": PIXELS, **self.extra}

    def __len__(self) -> int:
        return len(self.paths)

    def batches(self, pre: Preprocess, opts: LoadOptions):
        image_opts = image_options(pre, opts.fast_decode)

        def collate(items):
            index = [i for i, _, _ in items]
            images = normalize(torch.stack([img for _, img, _ in items]), image_opts.mean, image_opts.std)
            records = []
            for i, _, digest in items:
                record = dict(self.records[i])
                if digest is not None:
                    record["digest"] = digest
                records.append(record)
            return images, records, index

        loader = DataLoader(_DecodeFiles(self.paths, image_opts, self.digest), batch_size=opts.batch_size,
                            num_workers=opts.workers, collate_fn=collate, shuffle=False)
        for images, records, _ in loader:
            yield images, records


def _records_digest(records: list[dict]) -> str:
    import json

    return hashlib.blake2b(json.dumps(records, sort_keys=True).encode(), digest_size=16).hexdigest()


class ShardImages(ImageSet):
    """WebDataset shards; ``to_record(batch, i)`` turns row ``i`` of a :class:`ShardStream` batch into a record."""

    def __init__(self, name: str, spec: str, to_record: Callable[[dict, int], dict],
                 finalize: Callable | None = None, extra: dict | None = None):
        self.name, self.spec, self.to_record = name, spec, to_record
        self.shards = expand(spec)
        self._finalize = finalize
        self._skipped: dict = {}
        self.extra = extra or {}

    def fingerprint(self) -> dict:
        return {"kind": "shards", "name": self.name, "files": _stat_digest([s.url for s in self.shards]),
                "pixels": PIXELS, **self.extra}

    def __len__(self) -> int:
        counts = [s.samples for s in self.shards]
        return sum(counts) if None not in counts else 0

    def batches(self, pre: Preprocess, opts: LoadOptions):
        image_opts = image_options(pre, opts.fast_decode)
        stream = ShardStream(self.spec, StreamOptions(batch_size=opts.batch_size, shuffle_buffer=0, require_text=False,
                                                      image=image_opts, normalize=False), rank=0, world_size=1)
        loader = Loader(stream, workers=opts.workers)
        for batch in loader:
            images = normalize(batch["image"], image_opts.mean, image_opts.std)
            yield images, [self.to_record(batch, i) for i in range(len(batch["key"]))]
        self._skipped = dict(loader.skipped)

    def skipped(self) -> dict:
        return self._skipped

    def finalize(self, features, records):
        return self._finalize(features, records) if self._finalize else (features, records)


def batch_count(n: int, batch_size: int) -> int | None:
    return math.ceil(n / batch_size) if n else None


def merge_by_image(features: torch.Tensor, records: list[dict]) -> tuple[torch.Tensor, list[dict]]:
    """vlp caption shards may hold one sample per caption: keep one embedding per image (the first sample's)
    and every caption of it (``json["captions"]`` when present, else the samples' texts in key order)."""
    first: dict[str, int] = {}
    captions: dict[str, list[str]] = {}
    for i, r in enumerate(records):
        image = r.get("image") or r["key"]
        if image not in first:
            first[image] = i
            captions[image] = list(r.get("all_captions") or [])
        if not records[first[image]].get("all_captions") and r.get("caption"):
            captions[image].append(r["caption"])
    keep = list(first.values())
    merged = []
    for image, i in first.items():
        record = {k: v for k, v in records[i].items() if k not in ("caption", "all_captions")}
        record["captions"] = captions[image]
        merged.append(record)
    return features[keep], merged
