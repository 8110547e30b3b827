"""Datasets vlp builds from an installed package, so the pipeline runs without downloading anything.

``builtin:<name>`` is a shard spec (:func:`vlp.data.shards.expand` resolves it to the train shards) and an eval
suite's ``data_root``. Each set is built once into the cache (``$VLP_CACHE``, else ``~/.cache/vlp``):
``builtin/<name>/shards`` (train split as caption shards) and ``builtin/<name>/raw/test/<class>/`` (held-out
images as a labelled folder).

``digits``: scikit-learn's 8x8 handwritten digits as 32x32 PNGs with several caption phrasings per digit,
written to shards by the same writer users run on their own data.

``people``: drawn pedestrian-like figures (48x128 PNGs: a head, a top and trousers of an identity's two colours from
:data:`vlp.data.attributes.COLORS`, on a noisy background, each image shifted, scaled and lit differently), 24
identities x 8 images as identity folders, captioned by the attribute reader as ``vlp shards identities --captions
attributes`` does; 6 more identities held out as ``raw/val/{query,gallery}``. A CPU-sized stand-in for person data,
so that identity-level configs run without ../shared/data.
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


# a pure colour per name of the reader's vocabulary (vlp/data/attributes.py), as the drawn clothes wear it
PAINT = {"black": (20, 20, 24), "white": (235, 235, 230), "grey": (128, 128, 128), "red": (200, 30, 30),
         "orange": (235, 130, 20), "yellow": (230, 215, 40), "green": (40, 150, 50), "blue": (35, 70, 190),
         "purple": (120, 40, 150), "pink": (240, 140, 180), "brown": (110, 70, 35)}


def draw_person(upper: str, lower: str, rng: np.random.Generator, size: tuple[int, int] = (48, 128)) -> Image.Image:
    """A 48x128 figure: head, top of colour ``upper``, trousers of ``lower``, on a noisy grey-green background;
    position, width, lighting and pixel noise drawn from ``rng``."""
    w, h = size
    img = np.empty((h, w, 3), np.float32)
    img[:] = rng.uniform(90, 170, 3) * np.array([1.0, 1.05, 0.95])
    img += rng.normal(0, 12, img.shape)
    cx, half = w / 2 + rng.uniform(-3, 3), w * rng.uniform(0.22, 0.3)
    top = rng.uniform(-3, 3)
    ys, xs = np.mgrid[0:h, 0:w]

    def band(y0, y1, x_half, colour):
        mask = (ys >= top + y0 * h) & (ys < top + y1 * h) & (np.abs(xs - cx) < x_half)
        img[mask] = np.array(colour, np.float32) * rng.uniform(0.85, 1.1) + rng.normal(0, 8, (mask.sum(), 3))

    head = ((ys - top - 0.1 * h) / (0.08 * h)) ** 2 + ((xs - cx) / (0.16 * w)) ** 2 < 1
    img[head] = (205, 160, 130)
    band(0.19, 0.52, half, PAINT[upper])
    band(0.52, 0.9, half * 0.8, PAINT[lower])
    band(0.9, 0.96, half * 0.8, PAINT["black"])
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def write_people_images(out: Path, train: int = 24, held_out: int = 6, per_person: int = 8):
    """The ``people`` set (module docstring); returns (train items, val folder)."""
    from vlp.data.attributes import COLORS, caption_image

    rng = np.random.default_rng(0)
    pairs = [(u, lo) for u in COLORS for lo in COLORS if u != lo]
    chosen = [pairs[i] for i in rng.choice(len(pairs), train + held_out, replace=False)]
    for n, (upper, lower) in enumerate(chosen):
        for j in range(per_person):
            if n < train:
                folder = out / "train" / f"{n:04d}"
            else:  # two query images per held-out person, the rest its gallery
                folder = out / "val" / ("query" if j < 2 else "gallery") / f"{n:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            draw_person(upper, lower, rng).save(folder / f"{j % 2 + 1:02d}_{j}.png")
    return sources.identity_folders(out / "train", source="people", captioner=caption_image), out / "val"


def _digits(out: Path):
    train_csv, test_root = write_digit_images(out)
    return sources.table(train_csv, source="digits"), test_root


# name -> writer of <root>/raw, returning (the train items that become <root>/shards, the held-out folder)
BUILDERS: dict[str, Callable[[Path], tuple]] = {"digits": _digits, "people": write_people_images}


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
            items, _ = BUILDERS[name](root / "raw")
            write_shards(items, root / "shards",
                         WriterOptions(samples_per_shard=256, workers=1, overwrite=True), source=name, progress=False)
    return root


def builtin_shards(name: str) -> Path:
    """The folder of train shards (with their manifest.json) of builtin set ``name``."""
    return builtin_data(name) / "shards"
