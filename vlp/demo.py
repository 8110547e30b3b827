"""``vlp demo``: the pipeline end to end on data that scikit-learn ships (8x8 handwritten digits).

Digits become PNG files plus a CSV of captions (several phrasings per digit), the CSV becomes shards through
the same writer users run on their data, and the shards are streamed back through the training loader.
"""
from __future__ import annotations

import csv
import json
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
    """Shards from digits, a tiny CLIP trained on them (configs/digits-tiny.yaml), zero-shot on held-out digits."""
    import shutil

    from vlp.config import load_experiment
    from vlp.train.loop import Trainer

    config = Path(__file__).resolve().parents[1] / "configs" / "digits-tiny.yaml"
    if not config.exists():
        raise FileNotFoundError(f"{config} is missing: run the demo from a clone of the repository")
    out = Path(out)
    if (out / "config.yaml").exists():
        shutil.rmtree(out)  # a previous demo run: start afresh rather than resume it
    start = time.time()
    root = builtin_data("digits")
    manifest = json.loads((root / "shards" / "manifest.json").read_text())
    print(f"[1/3] data: {manifest['samples']:,} captioned digits in {len(manifest['shards'])} shards at "
          f"{root / 'shards'}; held-out test images in {root / 'raw' / 'test'}", flush=True)
    exp = load_experiment(config, ["eval.suite=digits", "train.resume=never"] if quick else [], smoke=quick)
    print(f"[2/3] training {exp.model.name} for {exp.train.epochs} epochs ({config.name}"
          f"{', smoke' if quick else ''}) into {out}", flush=True)
    trainer = Trainer(exp, out)
    trainer.train()
    print("[3/3] zero-shot evaluation on held-out digits (chance: 10%)", flush=True)
    summaries = sorted((out / "eval").glob("step-*/summary.md"))
    if summaries:
        print(summaries[-1].read_text())
    print(f"done in {time.time() - start:.0f}s: loss curve {out / 'plots' / 'loss.png'}, "
          f"results in {summaries[-1].parent if summaries else out}", flush=True)
    return 0
