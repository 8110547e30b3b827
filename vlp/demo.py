"""``vlp demo``: the pipeline end to end on data that scikit-learn ships (8x8 handwritten digits).

Digits become PNG files plus a CSV of captions (several phrasings per digit), the CSV becomes shards through
the same writer users run on their data, and the shards are streamed back through the training loader.
"""
from __future__ import annotations

import csv
import fcntl
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from vlp.data import sources
from vlp.data.writer import WriterOptions, write_shards

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CAPTION_TEMPLATES = ["a photo of the digit {word}.", "a handwritten {word}.", "the number {n}, written by hand.",
                     "a blurry picture of a {word}.", "digit {n}."]


def write_digit_images(out: Path, size: int = 32) -> tuple[Path, Path]:
    """Digits as PNGs; returns (train CSV, test folder). The last 20% of each class is held out for testing."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0 * 255).astype(np.uint8)
    rows, seen = [], {}
    test_root = out / "test"
    for i, (img, label) in enumerate(zip(images, digits.target)):
        label = int(label)
        seen[label] = seen.get(label, 0) + 1
        held_out = seen[label] > 0.8 * int((digits.target == label).sum())
        folder = (test_root / DIGIT_WORDS[label]) if held_out else (out / "train" / str(label))
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:04d}.png"
        Image.fromarray(img).resize((size, size), Image.BICUBIC).convert("RGB").save(path)
        if not held_out:
            template = CAPTION_TEMPLATES[i % len(CAPTION_TEMPLATES)]
            rows.append({"image": str(path.relative_to(out)), "caption": template.format(word=DIGIT_WORDS[label], n=label),
                         "label": label})
    train_csv = out / "train.csv"
    with open(train_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "caption", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return train_csv, test_root


def cache_dir() -> Path:
    return Path(os.environ.get("VLP_CACHE", Path.home() / ".cache" / "vlp"))


def builtin_data(name: str) -> Path:
    """A dataset vlp can make from an installed package, built once into the cache (``VLP_CACHE``):
    ``<root>/shards`` (train split, caption shards) and ``<root>/raw/test/<class>/`` (held-out image folder)."""
    if name != "digits":
        raise ValueError(f"unknown builtin dataset {name!r} (known: digits)")
    root = cache_dir() / "builtin" / name
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # torchrun ranks may ask at the same moment
        if not (root / "shards" / "manifest.json").exists():
            train_csv, _ = write_digit_images(root / "raw")
            write_shards(sources.table(train_csv, source=name), root / "shards",
                         WriterOptions(samples_per_shard=256, workers=1, overwrite=True), source=name, progress=False)
    return root


def builtin_shards(name: str) -> Path:
    return builtin_data(name) / "shards"


def run_demo(out: str | Path = "runs/demo", quick: bool = False) -> int:
    from vlp.data import Loader, ShardStream, StreamOptions
    from vlp.data.preprocess import ImageOptions
    from vlp.data.writer import format_report

    out = Path(out)
    raw = out / "raw"
    print(f"[1/2] digits -> PNG + CSV in {raw}")
    train_csv, _ = write_digit_images(raw)
    shards = out / "shards"
    manifest = write_shards(sources.table(train_csv, source="digits"), shards,
                            WriterOptions(samples_per_shard=256, workers=2, overwrite=True), source="digits")
    print(format_report(manifest, shards))

    print("[2/2] streaming the shards back (2 workers, 32 px, batch 128)")
    stream = ShardStream(str(shards), StreamOptions(batch_size=128, image=ImageOptions(size=32)))
    loader = Loader(stream, workers=2)
    start, seen, labels = time.time(), 0, set()
    for batch in loader:
        seen += len(batch["uid"])
        labels.update(batch["meta"][i]["label"] for i in range(len(batch["uid"])))
    elapsed = time.time() - start
    print(f"streamed {seen:,} of {manifest['samples']:,} samples ({seen / elapsed:,.0f} samples/s), "
          f"{len(labels)} digits, skipped: {dict(loader.skipped) or 'none'}")
    return 0 if seen == manifest["samples"] else 1
