"""A noisy image-text pool from Flickr8k train, for the data-filtering experiment (configs/dfn-flickr8k.yaml).

One sample per caption (30,000); a seeded half of the samples get the caption of another, randomly drawn image
instead of their own, as web pools hold pairs whose text does not describe the image. Each sample's json keeps
the ground truth (``corrupted``) for measuring a filter afterwards; no vlp stage reads it. ``json["captions"]`` is
dropped so that training sees only the pair's own (possibly wrong) text.

    .venv/bin/python datasets/flickr8k_noisy.py work/pools/flickr8k-noisy [--data ../shared/data] [--resize 64]
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from vlp.data import sources
from vlp.data.writer import WriterOptions, format_report, write_shards


def noisy_items(data: Path, fraction: float, seed: int, split: str = "train") -> list:
    flickr = data / "flickr8k"
    items = [x for x in sources.caption_file(flickr / "images", flickr / "captions.txt", flickr / f"splits/{split}.txt",
                                             "flickr8k-noisy", per_caption=True) if isinstance(x, sources.Item)]
    rng = random.Random(seed)
    corrupt = set(rng.sample(range(len(items)), round(fraction * len(items))))
    texts = [item.text for item in items]
    images = [item.meta["image"] for item in items]
    for i, item in enumerate(items):
        item.meta.pop("captions")
        item.meta["corrupted"] = i in corrupt
        if i in corrupt:
            j = rng.randrange(len(items))
            while images[j] == images[i]:  # another image's caption, never one of its own five
                j = rng.randrange(len(items))
            item.text = texts[j]
    return items


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parent.parent.parent / "shared" / "data")
    p.add_argument("--fraction", type=float, default=0.5, help="share of pairs given another image's caption")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train", help="Flickr8k split (train, dev or test)")
    p.add_argument("--resize", type=int, default=64, help="shorter side of the stored images (the CPU recipes "
                                                          "train at 32 px; 0 keeps the stored 160 px)")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    items = noisy_items(args.data, args.fraction, args.seed, args.split)
    opts = WriterOptions(samples_per_shard=args.samples_per_shard, workers=args.workers, resize=args.resize or None)
    manifest = write_shards(items, args.out, opts, source="flickr8k-noisy")
    print(format_report(manifest, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
