"""How long a training loop waits for the first batch of each epoch: ``Loader`` with and without ``lookahead``.

    .venv/bin/python benchmarks/epoch_stall.py                        # flickr8k-fast's data settings, 3 epochs each way
    .venv/bin/python benchmarks/epoch_stall.py --busy 0.6 --epochs 4 --rounds 2

The consumer stands in for the trainer: after each batch it computes for ``--busy`` seconds (a matmul loop on
the main process's torch threads, so the loader workers compete for the cores as they do in training). The
figure is the wall time spent inside ``next()`` for each epoch's first batch (epoch 0 included: nothing can
overlap it) and for all other batches. Data: the per-image 64 px Flickr8k shards of ``configs/flickr8k-fast.yaml``
(written by ``train_compare.py --fast`` or the command in that config), batch 128, 2 workers, shuffle buffer 3000,
32 px crops, ``vlp-r10t-32``'s tokenizer. Both settings run in this process, one after the other, alternating.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import open_clip
import torch

import vlp.models  # noqa: F401 - registers vlp-r10t-32
from vlp.data import Loader, ShardStream, StreamOptions
from vlp.data.preprocess import ImageOptions

REPO = Path(__file__).resolve().parents[1]
SHARDS = REPO / "work/shards/flickr8k-per-image-64/train"


def busy(seconds: float, work: torch.Tensor) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        work @ work


def run(lookahead: bool, args, tokenizer) -> dict:
    opts = StreamOptions(batch_size=128, shuffle_buffer=3000, seed=0, drop_last=True, caption="random",
                         image=ImageOptions(size=32, train=True, scale=(0.7, 1.0)))
    stream = ShardStream(f"{SHARDS}/{{00000..00005}}.tar", opts, tokenizer, rank=0, world_size=1)
    loader = Loader(stream, workers=args.workers, lookahead=lookahead)
    work = torch.randn(256, 256)
    first, other = [], []
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        batches = iter(loader)
        while True:
            start = time.perf_counter()
            batch = next(batches, None)
            waited = time.perf_counter() - start
            if batch is None:
                break
            (first if len(first) == epoch else other).append(waited)
            busy(args.busy, work)
    return {"lookahead": lookahead, "first_batch_s": [round(x, 3) for x in first],
            "other_batches_mean_s": round(statistics.mean(other), 4), "batches": len(first) + len(other)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--busy", type=float, default=0.6, help="seconds of compute per batch (a trainer's step)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    if not (SHARDS / "manifest.json").exists():
        sys.exit(f"{SHARDS} is missing: write it with the command in configs/flickr8k-fast.yaml")
    torch.set_num_threads(2)
    tokenizer = open_clip.get_tokenizer("vlp-r10t-32")
    results = []
    for r in range(args.rounds):
        for lookahead in ((False, True) if r % 2 == 0 else (True, False)):
            results.append(run(lookahead, args, tokenizer))
            print(json.dumps(results[-1]), flush=True)
    for lookahead in (False, True):
        rows = [r for r in results if r["lookahead"] == lookahead]
        later = [x for r in rows for x in r["first_batch_s"][1:]]
        print(f"lookahead={lookahead}: epochs 1+ first-batch wait mean {statistics.mean(later):.3f} s "
              f"(max {max(later):.3f}), epoch 0 {statistics.mean(r['first_batch_s'][0] for r in rows):.3f} s, "
              f"other batches {statistics.mean(r['other_batches_mean_s'] for r in rows):.4f} s")


if __name__ == "__main__":
    main()
