"""Datasets vlp builds from an installed package, so the pipeline runs without downloading anything.

``builtin:<name>`` is a shard spec (:func:`vlp.data.shards.expand` resolves it to the train shards) and an eval
suite's ``data_root``. Each set is built once into the cache (``$VLP_CACHE``, else ``~/.cache/vlp``):
``builtin/<name>/shards`` (train split as caption shards) and ``builtin/<name>/raw/test/<class>/`` (held-out
images as a labelled folder).

``digits``: scikit-learn's 8x8 handwritten digits as 32x32 PNGs with several caption phrasings per digit,
written to shards by the same writer users run on their own data.
"""
from __future__ import annotations

import csv
import fcntl
import os
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from vlp.data import sources
from vlp.data.shards import BUILTIN
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
            caption = template.format(word=DIGIT_WORDS[label], n=label)
            rows.append({"image": str(path.relative_to(out)), "caption": caption, "label": label})
    train_csv = out / "train.csv"
    with open(train_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "caption", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return train_csv, test_root


# name -> writer of <root>/raw (returns the train CSV, whose rows become <root>/shards)
BUILDERS: dict[str, Callable[[Path], tuple[Path, Path]]] = {"digits": write_digit_images}


class UnknownBuiltin(ValueError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("VLP_CACHE", Path.home() / ".cache" / "vlp"))


def builtin_data(name: str) -> Path:
    """The root folder of builtin set ``name``, built on first use."""
    if name not in BUILDERS:
        raise UnknownBuiltin(f"unknown builtin dataset {name!r}; known: "
                         + ", ".join(f"{BUILTIN}{known}" for known in sorted(BUILDERS)))
    root = cache_dir() / "builtin" / name
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # torchrun ranks and loader workers may ask at the same moment
        if not (root / "shards" / "manifest.json").exists():
            train_csv, _ = BUILDERS[name](root / "raw")
            write_shards(sources.table(train_csv, source=name), root / "shards",
                         WriterOptions(samples_per_shard=256, workers=1, overwrite=True), source=name, progress=False)
    return root


def builtin_shards(name: str) -> Path:
    """The folder of train shards (with their manifest.json) of builtin set ``name``."""
    return builtin_data(name) / "shards"
