"""A training set held in memory (``data.in_memory: true``): decoded and tokenised once, then batches are nearly free.

For sets that fit in RAM (Flickr8k's 6,000 training images at 64 px take 74 MB as uint8), the streaming loader's
work per sample (tar headers, JPEG decoding, cropping, tokenising: about 80 ms of CPU per batch of 128 on the
2-core machine) runs in worker processes that take cores from the training step. Here it runs once, at start-up;
per batch there is one ``torchvision.ops.roi_align`` call for all the crops.

Same semantics as the stream's epoch mode, with a data state of its own:
- every sample once per epoch, in an order shuffled with ``seed`` and the epoch, the same on every rank; rank r
  of W takes the r-th of W equal parts, so ranks differ by at most one sample;
- the crop boxes (torchvision's RandomResizedCrop parameters, ``data.scale``), flips and captions of a batch are
  drawn from a generator seeded with (seed, epoch, rank, batch), so ``state_dict()`` is just (epoch, next batch)
  and a resumed run sees exactly the batches an uninterrupted one would;
- unreadable samples are skipped and counted at load time (``skipped``).
The crop is resampled with roi_align (bilinear, with as many samples per output pixel as the box is larger than
the output: an area-like filter) instead of PIL's bicubic: on a smooth 64 px test image shrunk to 32 px the two
differ by 0.24 grey levels on average (``tests/test_data_memory.py``).
``data.color_jitter``, ``data.token_drop`` and ``data.cutout`` (vlp/data/augment.py) are drawn after the rest of
the batch.
``data.size_schedule`` (in memory only) lowers the crop size of early epochs (progressive resizing, as in FFCV's
ImageNet recipes); a convolutional tower takes any size, and the last entry must be the model's own.

``data.identity_batches`` [P, K] makes every batch P distinct identities x K images each (:func:`identity_order`),
for identity-level objectives, which need positives in the batch: every sample at least once per epoch (an
identity's last group is topped up with other images of it), a batch order drawn from (seed, epoch), the same on
every rank, rank r of W taking batches r, r+W, ... (the last batches beyond a multiple of W are left out, so that
ranks step together); the position is still (epoch, next batch).

Several sources mix by weight (``data.train`` with weights and ``data.samples_per_epoch``): an epoch holds
``samples_per_epoch`` samples, source i's share of them in proportion to its weight (largest remainders), taken in
turn from an endless sequence of that source's samples, each pass over it in a fresh order seeded by (seed, source,
pass); the epoch's samples are then shuffled together. So every sample of a source is seen once before any is seen
twice, and the position is still (epoch, next batch). A source with label prompts (``Source.prompts``) holds
label data: its samples' texts are their class's prompts, one drawn per step. Not for resampled sources (they
stream).
"""
from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter
from typing import Callable, Iterator

import numpy as np
import torch
from torchvision.ops import roi_align

from vlp.data.augment import augmenting
from vlp.data.batch import collate
from vlp.data.preprocess import BadSample, decode_rgb, parse_sample, pick_captions, random_resized_crop_box
from vlp.data.shards import expand, iter_raw_samples
from vlp.data.stream import (Source, StreamOptions, check_caption_options, describe_shards, describe_skipped,
                             split_range)

log = logging.getLogger(__name__)


class MemoryLoader:
    """The interface of :class:`vlp.data.Loader` (iteration, epochs, state, ``skipped``) over samples in memory."""

    def __init__(self, sources: str | list[str] | list[Source], opts: StreamOptions, tokenizer: Callable,
                 rank: int = 0, world_size: int = 1, size_schedule: list[tuple[int, int]] | None = None):
        check_caption_options(opts.caption, opts.captions_per_sample)
        if not opts.image.train:
            raise ValueError("data.in_memory makes training batches (random crops) only")
        if not isinstance(sources, list) or not all(isinstance(x, Source) for x in sources):
            sources = [Source(sources)]
        if len(sources) > 1 and not opts.samples_per_epoch:
            raise ValueError("data.samples_per_epoch: needed to mix several sources in memory (how many samples make "
                             "an epoch)")
        if any(x.weight <= 0 for x in sources):
            raise ValueError(f"source weights must be positive, got {[x.weight for x in sources]}")
        self.sources = sources
        self.opts, self.rank, self.world_size = opts, rank, world_size
        self.size_schedule = check_size_schedule(size_schedule, opts.image.size)
        self.skipped: Counter = Counter()
        self.epoch, self.next_batch = 0, 0
        self._identity_epoch: tuple[int, list[list[int]]] | None = None
        self._load(sources, tokenizer)
        if opts.identity_batches:
            check_identity_batches(opts.identity_batches, opts.batch_size)
            known = {r["identity"] for r in self.rows} - {-1}
            if len(known) < opts.identity_batches[0]:
                raise ValueError(f"data.identity_batches: {opts.identity_batches[0]} identities per batch, but "
                                 f"{self.shard_text} holds {len(known)} (json identity)")

    # -- loading ---------------------------------------------------------------------------------------------
    def _load(self, sources: list[Source], tokenizer) -> None:
        start = time.time()
        size = self.opts.image.size
        min_crop = math.sqrt(self.opts.image.scale[0] * min(self.opts.image.ratio))  # smallest crop side / image side
        need = math.ceil(size / min_crop)  # decode JPEGs at the smallest DCT scale that keeps every crop sharp
        images, captions, rows = [], [], []

        def on_error(reason, where):
            self.skipped[reason] += 1
            log.warning("%s: %s", reason, where)

        texts: list[str] = []  # every distinct caption list once (label data shares its class's prompts)
        self.ranges = []  # (first row, rows) of each source
        descriptions = []
        for index, source in enumerate(sources):
            expanded = expand(source.shards)
            descriptions.append(describe_shards(source.shards, expanded))
            first, by_class = len(rows), {}
            for shard in expanded:
                for raw in iter_raw_samples(shard.url, on_error=on_error):
                    try:
                        parsed = parse_sample(raw, self.opts.require_text, self.opts.caption, prompts=source.prompts)
                        img, _ = decode_rgb(parsed["image"], need if self.opts.image.draft else None)
                        images.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
                    except BadSample as e:
                        on_error(e.reason, f"{raw.get('__url__')}: {raw['__key__']}")
                        continue
                    if source.prompts is not None:  # one token block per class, not per sample
                        if parsed["label"] not in by_class:
                            by_class[parsed["label"]] = (len(texts), parsed["captions"])
                            texts.extend(parsed["captions"])
                        start, listed = by_class[parsed["label"]]
                    else:
                        start, listed = len(texts), parsed["captions"]  # drawn from per batch
                        texts.extend(listed)
                    captions.append((start, listed))
                    rows.append({**{k: parsed[k] for k in ("uid", "key", "kind", "label", "identity", "meta")},
                                 "source": index})
            self.ranges.append((first, len(rows) - first))
        self.shard_text = "; ".join(descriptions)
        empty = [i for i, (_, n) in enumerate(self.ranges) if n == 0]
        if empty:
            raise ValueError(f"data.in_memory: no readable sample in {descriptions[empty[0]]}; skipped: "
                             f"{describe_skipped(self.skipped)}")
        self.sizes = torch.tensor([[im.shape[1], im.shape[2]] for im in images])  # (h, w) as decoded
        h, w = self.sizes.max(0).values.tolist()
        self.images = torch.zeros(len(images), 3, h, w, dtype=torch.uint8)  # top-left aligned, padded
        for i, im in enumerate(images):
            self.images[i, :, :im.shape[1], :im.shape[2]] = im
        self.tokens = tokenizer(texts)
        self.first_caption = torch.tensor([start for start, _ in captions])
        self.caption_counts = [len(listed) for _, listed in captions]
        self.captions, self.rows = [listed for _, listed in captions], rows
        mb = self.images.numel() / 2 ** 20
        used = int(self.sizes.prod(1).sum()) * 3 / 2 ** 20
        if mb > 2 * used:  # images of mixed shapes share one padded tensor
            log.warning("data.in_memory: images of mixed sizes (up to %dx%d) are padded: %.0f MB held for %.0f MB of "
                        "pixels", w, h, mb, used)
        log.info("data.in_memory: %d samples (%d distinct texts) in %.0f MB, loaded in %.1f s; skipped %s",
                 len(rows), len(texts), mb, time.time() - start, dict(self.skipped) or "none")

    # -- the Loader interface --------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        """Samples in one epoch over all ranks."""
        return self.opts.samples_per_epoch if len(self.sources) > 1 else len(self.rows)

    def _rank_order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.opts.seed * 1_000_003 + epoch)
        order = self._mixed(epoch) if len(self.sources) > 1 else torch.arange(self.num_samples)
        if self.opts.shuffle_buffer:
            order = order[torch.randperm(len(order), generator=generator)]
        lo, hi = split_range(self.num_samples, self.rank, self.world_size)
        return order[lo:hi]

    def _mixed(self, epoch: int) -> torch.Tensor:
        """The rows of a mixed epoch, source by source (module docstring)."""
        weights = [x.weight for x in self.sources]
        exact = [self.num_samples * w / sum(weights) for w in weights]
        counts = [math.floor(e) for e in exact]
        for i in sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))[:self.num_samples - sum(counts)]:
            counts[i] += 1  # largest remainders first
        rows = []
        for index, ((first, n), count) in enumerate(zip(self.ranges, counts)):
            positions = torch.arange(epoch * count, (epoch + 1) * count)  # in the source's endless sequence
            passes = positions // n
            taken = torch.empty(count, dtype=torch.long)
            for p in passes.unique().tolist():
                seed = random.Random(f"{self.opts.seed}/{index}/{p}").getrandbits(62)
                order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
                mask = passes == p
                taken[mask] = order[positions[mask] % n]
            rows.append(first + taken)
        return torch.cat(rows)

    def _identity_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches (row lists) of an identity-batched epoch: every W-th of the epoch's batches, as many
        on every rank."""
        if self._identity_epoch is None or self._identity_epoch[0] != epoch:
            p, k = self.opts.identity_batches
            batches = identity_order([r["identity"] for r in self.rows], p, k, self.opts.seed, epoch)
            usable = len(batches) // self.world_size * self.world_size
            self._identity_epoch = (epoch, batches[self.rank:usable:self.world_size])
        return self._identity_epoch[1]

    def batches_per_epoch(self) -> int:
        if self.opts.identity_batches:
            return len(self._identity_batches(self.epoch))
        lo, hi = split_range(self.num_samples, self.rank, self.world_size)
        n, size = hi - lo, self.opts.batch_size
        return n // size if self.opts.drop_last else -(-n // size)

    def image_size(self, epoch: int) -> int:
        """The crop size of an epoch: the last ``size_schedule`` entry that has started, else the model's."""
        size = self.opts.image.size
        for start, scheduled in self.size_schedule:
            if epoch >= start:
                size = scheduled
        return size

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.next_batch = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "next_batch": self.next_batch, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        if "next_batch" not in state:
            raise ValueError("this data position comes from the streaming loader, not data.in_memory: "
                             "resume with the same data.in_memory setting")
        self.epoch, self.next_batch = int(state["epoch"]), int(state["next_batch"])
        self.skipped = Counter(state.get("skipped", {}))

    def at_epoch_start(self) -> bool:
        """Whether iterating now starts epoch ``self.epoch`` from its beginning: False part-way through it, and after
        loading a state saved part-way (also one saved after its last batch, whose iteration yields nothing)."""
        return self.next_batch == 0

    def describe(self) -> str:
        """The shards loaded and the samples skipped (at load) per reason, for messages about this data."""
        return f"shards {self.shard_text}; skipped so far: {describe_skipped(self.skipped)}"

    def close(self) -> None:
        pass

    def __iter__(self) -> Iterator[dict]:
        if self.opts.identity_batches:
            batches = self._identity_batches(self.epoch)
            rows = [torch.tensor(b) for b in batches]
        else:
            order, size = self._rank_order(self.epoch), self.opts.batch_size
            rows = [order[b * size:(b + 1) * size] for b in range(self.batches_per_epoch())]
        for b in range(self.next_batch, len(rows)):
            self.next_batch = b + 1
            yield self._batch(rows[b], b)
        self.set_epoch(self.epoch + 1)

    # -- one batch ---------------------------------------------------------------------------------------------
    def _batch(self, indices: torch.Tensor, number: int) -> dict:
        opts = self.opts
        rng = random.Random(f"{opts.seed}/{self.epoch}/{self.rank}/{number}")
        idx = indices.tolist()
        boxes, flips, picks = [], [], []
        for j, i in enumerate(idx):
            h, w = self.sizes[i].tolist()
            left, top, right, bottom = random_resized_crop_box(w, h, opts.image.scale, opts.image.ratio, rng)
            boxes.append([j, left, top, right, bottom])
            flips.append(opts.image.hflip and rng.random() < 0.5)
            prompted = self.sources[self.rows[i]["source"]].prompts is not None  # a prompt drawn per step
            picks.append(pick_captions(self.caption_counts[i], "random" if prompted else opts.caption,
                                       opts.captions_per_sample, rng))
        images = roi_align(self.images[idx].float(), torch.tensor(boxes, dtype=torch.float32),
                           output_size=self.image_size(self.epoch), spatial_scale=1.0, sampling_ratio=-1,
                           aligned=True)
        flipped = torch.tensor(flips)
        if flipped.any():
            images[flipped] = images[flipped].flip(-1)
        images = images.round_().clamp_(0, 255)  # the uint8 pixel grid the stream's crops have
        tokens = self.tokens[[int(self.first_caption[i]) + c for i, chosen in zip(idx, picks) for c in chosen]]
        texts = [[self.captions[i][c] for c in chosen] for i, chosen in zip(idx, picks)]
        seed = rng.getrandbits(62) if augmenting(opts) else None  # the batch's last draw: the others stay as they were
        return collate([self.rows[i] for i in idx], texts, images, tokens, opts, seed)


def check_identity_batches(pk, batch_size: int, prefix: str = "data.") -> None:
    """``[P, K]`` with P >= 2 identities (a batch of one identity has no negatives) and K >= 1, P*K the batch size."""
    key = f"{prefix}identity_batches"
    if not (isinstance(pk, (list, tuple)) and len(pk) == 2 and all(isinstance(x, int) for x in pk)):
        raise ValueError(f"{key}: {pk!r} is not [P, K] (identities per batch, images per identity)")
    p, k = pk
    if p < 2 or k < 1:
        raise ValueError(f"{key}: [{p}, {k}] needs P >= 2 identities per batch (one identity alone has no negatives) "
                         "and K >= 1")
    if p * k != batch_size:
        raise ValueError(f"{key}: P x K = {p} x {k} = {p * k}, but {prefix}batch_size is {batch_size}: make them equal")


def identity_order(identities: list[int], p: int, k: int, seed: int, epoch: int) -> list[list[int]]:
    """An epoch of P x K batches over rows labelled ``identities`` (rows of identity -1 take no part), as lists of
    row indices: P distinct identities, K rows each, identity-major.

    Each identity's rows are shuffled and cut into groups of K; a short last group is topped up with other rows of
    the same identity (drawn without repeating while it has enough, with repeats when it holds fewer than K). Each
    batch takes one group from each of P distinct identities, drawn with probability growing with the groups they
    have left (Efraimidis-Spirakis weighted sampling), so identities run out together. When fewer than P identities
    have groups left, the last batches take theirs and fill up with fresh groups of other identities: every row is
    seen at least once per epoch. The same (seed, epoch) gives the same batches: a resumed run continues exactly.
    (torchreid's RandomIdentitySampler, Zhou et al., works alike but drops the short groups and the leftovers.)"""
    rng = random.Random(f"{seed}/identity/{epoch}")
    rows_of: dict[int, list[int]] = {}
    for row, identity in enumerate(identities):
        if identity >= 0:
            rows_of.setdefault(identity, []).append(row)
    if len(rows_of) < p:
        raise ValueError(f"data.identity_batches: {p} identities per batch, but the data holds {len(rows_of)}")

    def fresh_group(identity: int) -> list[int]:
        rows = rows_of[identity]
        return rng.sample(rows, k) if len(rows) >= k else rng.choices(rows, k=k)

    groups: dict[int, list[list[int]]] = {}
    for identity in sorted(rows_of):
        rows = rows_of[identity][:]
        rng.shuffle(rows)
        cut = [rows[i:i + k] for i in range(0, len(rows), k)]
        short = k - len(cut[-1])
        if short:
            others = [r for r in rows if r not in cut[-1]]
            cut[-1] += rng.sample(others, short) if len(others) >= short else rng.choices(rows, k=short)
        groups[identity] = cut
    batches = []
    while any(groups.values()):
        left = [i for i in sorted(groups) if groups[i]]
        if len(left) >= p:
            chosen = sorted(left, key=lambda i: rng.random() ** (1.0 / len(groups[i])), reverse=True)[:p]
            batches.append([row for i in chosen for row in groups[i].pop()])
        else:
            fill = rng.sample([i for i in sorted(groups) if i not in left], p - len(left))
            batches.append([row for i in left for row in groups[i].pop()]
                           + [row for i in fill for row in fresh_group(i)])
    return batches


def check_size_schedule(schedule, final: int) -> list[tuple[int, int]]:
    """``[[epoch, size], ...]``: from that epoch on, crops of that size (progressive resizing: cheaper early epochs at
    a lower resolution). Epochs increase; the last entry's size must be the model's, which evaluation uses."""
    if not schedule:
        return []
    try:
        pairs = [(int(e), int(s)) for e, s in schedule]
    except (TypeError, ValueError) as e:
        raise ValueError(f"data.size_schedule: {schedule!r} is not a list of [epoch, size] pairs") from e
    if any(b[0] <= a[0] for a, b in zip(pairs, pairs[1:])) or pairs[0][0] < 0 or any(s < 1 for _, s in pairs):
        raise ValueError(f"data.size_schedule: {schedule!r} needs increasing epochs (from 0) and positive sizes")
    if pairs[-1][1] != final:
        raise ValueError(f"data.size_schedule: the last size is {pairs[-1][1]}, not the model's {final}: the run "
                         "would end at a resolution it is not evaluated at")
    return pairs
