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
import io
import math
import os
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import functional as TF

from vlp.data import BadSample, ImageDecoder, ImageOptions, Loader, ShardStream, StreamOptions
from vlp.data.preprocess import IMAGE_KEYS, parse_sample
from vlp.data.shards import expand, iter_raw_samples
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

    def first_failure(self) -> str | None:
        """Where the first sample that could not be read is, and why (for error messages), or None."""
        return None


def _stat_digest(paths: list[str]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# Two files are the same picture when their stored sizes are equal and their box-filtered 16x16 RGB thumbnails differ
# by at most 4 grey levels (0..255) on average: a PNG re-save differs by 0, a JPEG re-encode of a pedestrian crop by
# at most 1.2 (quality 75 or 90), while two different images of one person differ by 21 or more (the shared set's
# train/ people, tests/test_eval_person_rules.py). Near-identical pictures (a still camera, a flat colour) count as
# copies too: no rule on pixels can tell them from a re-encode.
THUMBNAIL = 16
SAME_PICTURE_MAX_DIFFERENCE = 4.0
SAME_PICTURE = (f"same stored size, {THUMBNAIL}x{THUMBNAIL} box-filtered RGB thumbnails within "
                f"{SAME_PICTURE_MAX_DIFFERENCE:g} grey levels mean absolute difference")


def picture_signature(data: bytes) -> dict:
    """What :func:`same_picture` compares: the stored (width, height) and the hex bytes of the decoded image's
    thumbnail (RGB as CLIP_benchmark's loaders convert it, box filter)."""
    with Image.open(io.BytesIO(data)) as img:
        size = list(img.size)
        thumbnail = img.convert("RGB").resize((THUMBNAIL, THUMBNAIL), Image.BOX)
    return {"size": size, "thumbnail": thumbnail.tobytes().hex()}


def same_picture(a: list[dict | None], b: list[dict | None], chunk: int = 1024) -> torch.Tensor:
    """(len(a), len(b)) bool: which pairs of signatures are the same picture up to re-encoding (see
    :data:`SAME_PICTURE`); a missing signature (None) matches nothing."""
    def table(signatures):
        known = torch.tensor([s is not None for s in signatures], dtype=torch.bool)
        size = torch.tensor([s["size"] if s else [-1, -1] for s in signatures], dtype=torch.long).view(-1, 2)
        pixels = torch.stack([torch.frombuffer(bytearray.fromhex(s["thumbnail"]), dtype=torch.uint8).float()
                              if s else torch.zeros(3 * THUMBNAIL ** 2) for s in signatures]) if signatures \
            else torch.zeros(0, 3 * THUMBNAIL ** 2)
        return known, size, pixels

    known_a, size_a, pixels_a = table(a)
    known_b, size_b, pixels_b = table(b)
    out = torch.zeros(len(a), len(b), dtype=torch.bool)
    for start in range(0, len(a), chunk):
        rows = slice(start, start + chunk)
        close = torch.cdist(pixels_a[rows], pixels_b, p=1) / pixels_a.shape[1] <= SAME_PICTURE_MAX_DIFFERENCE
        same_size = (size_a[rows, None, :] == size_b[None, :, :]).all(-1)
        out[rows] = close & same_size & known_a[rows, None] & known_b[None, :]
    return out


class _DecodeFiles(Dataset):
    def __init__(self, paths: list[str], opts: ImageOptions, pictures: bool):
        self.paths, self.pictures = paths, pictures
        self.decoder = ImageDecoder(opts)
        self.rng = random.Random(0)  # the eval transform draws nothing; the decoder's signature wants one

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with open(self.paths[i], "rb") as f:
            data = f.read()
        try:
            # The signature lets an evaluator recognise one picture under two names, re-encoded or not.
            signature = picture_signature(data) if self.pictures else None
            return i, self.decoder(data, self.rng), signature
        except (BadSample, OSError, ValueError) as e:
            raise ValueError(f"{self.paths[i]}: {e}") from e


class FileImages(ImageSet):
    """Image files with their records; ``pictures=True`` adds each file's :func:`picture_signature` to its record
    (as ``picture``)."""

    def __init__(self, name: str, paths: list[str], records: list[dict], pictures: bool = False,
                 extra: dict | None = None):
        if len(paths) != len(records):
            raise ValueError("one record per image path expected")
        self.name, self.paths, self.records, self.pictures = name, paths, records, pictures
        self.extra = extra or {}

    def fingerprint(self) -> dict:
        return {"kind": "files", "name": self.name, "files": _stat_digest(self.paths), "count": len(self.paths),
                "pictures": SAME_PICTURE if self.pictures else None, "records": _records_digest(self.records),
                "pixels": PIXELS, **self.extra}

    def __len__(self) -> int:
        return len(self.paths)

    def batches(self, pre: Preprocess, opts: LoadOptions):
        image_opts = image_options(pre, opts.fast_decode)

        def collate(items):
            index = [i for i, _, _ in items]
            images = normalize(torch.stack([img for _, img, _ in items]), image_opts.mean, image_opts.std)
            records = []
            for i, _, signature in items:
                record = dict(self.records[i])
                if signature is not None:
                    record["picture"] = signature
                records.append(record)
            return images, records, index

        loader = DataLoader(_DecodeFiles(self.paths, image_opts, self.pictures), batch_size=opts.batch_size,
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

    def first_failure(self) -> str | None:
        """The first sample, in shard order, without an image or whose image fails to decode: read again, only
        for the message of a run that stops on it."""
        decoder = ImageDecoder(ImageOptions(size=8, train=False, draft=False))
        rng = random.Random(0)
        for shard in self.shards:
            problems: list[str] = []
            for raw in iter_raw_samples(shard.url, on_error=lambda reason, where: problems.append(where)):
                members = ", ".join(sorted(k for k in raw if not k.startswith("__")))
                try:
                    decoder(parse_sample(raw, require_text=False, caption="first")["image"], rng)
                except BadSample as e:
                    if e.reason == "no_image":
                        return (f"{shard.url}: sample {raw['__key__']} has no image member of a supported type "
                                f"({', '.join(IMAGE_KEYS)}); it has: {members or 'nothing'}")
                    return f"{shard.url}: sample {raw['__key__']} ({members}): {e}"
            if problems:
                return problems[0]
        return None

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
