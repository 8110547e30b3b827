"""Streaming batches from shards: split over ranks and workers, shuffled, resampled or mixed.

Splitting policy (epoch mode). The shards of an epoch are put in one order (shuffled with ``seed + epoch``,
identical on every rank) and seen as one sequence of N samples. Rank r of W takes the samples
``[N*r//W, N*(r+1)//W)``; worker k of K on that rank takes the same fraction of its rank's range. Every
sample is read exactly once per epoch, whatever the shard count: ranks differ by at most one sample, and
workers never sit idle when there are fewer shards than workers x ranks (a shard may be read by several
workers, each keeping its own part of it). This needs exact per-shard counts, which vlp's manifest gives
(foreign local tars are counted from their headers; a damaged one counts the samples before its damage, is read up
to there, and its damage is counted as skipped, once per epoch, by the slot that reads its last piece). Shards of
unknown size (``pipe:``, remote without a manifest) fall back to whole shards dealt round-robin to the W*K slots,
with a warning when some slot gets none.

Resampled mode draws shards with replacement, forever, from a per-(rank, worker, epoch) seeded generator;
``samples_per_epoch`` then sets where an epoch ends. Several sources with weights are always resampled and
interleaved so that the realised proportions follow the weights at every prefix (smooth weighted round-robin),
then shuffled together by the buffer.

Bad samples are skipped and counted per reason; each batch carries the counts its worker has accumulated
since its previous batch under ``"skipped"``, and :class:`Loader` sums them (``loader.skipped``). A resumed worker
drops the counts of the samples it skips over: the interrupted run's batches carried them.

Identity batches (``identity_batches`` (P, K), epoch mode): after the shuffle buffer, each worker holds samples per
identity (json ``identity``) until K of one identity are there, and emits a batch as soon as K-groups of P distinct
identities are ready, oldest first (:func:`identity_groups`). Shards written from identity folders keep a person's
images together, so groups fill quickly; a buffer holds at most K - 1 samples per identity seen. What cannot make a
batch at the end of an epoch (an identity with fewer than K samples left, fewer than P identities ready) is counted
as skipped (``identity_leftover``), as is a sample without an identity (``no_identity``). The position a worker
reports is then the number of batches it has made: a resumed worker groups the same raw samples again (reading
only their json) and decodes from the next batch on. Epoch lengths are unknown in this mode (``train.max_steps``).

Batch augmentations (``color_jitter``, ``token_drop``, ``cutout``: vlp/data/augment.py) draw from a generator seeded by
(seed, epoch, worker slot, sample position), so a resumed stream replays them too.
"""
from __future__ import annotations

import itertools
import json
import logging
import multiprocessing
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlp.data.augment import augmenting, check_augment
from vlp.data.batch import collate
from vlp.data.lifetime import die_with_parent
from vlp.data.preprocess import BadSample, ImageDecoder, ImageOptions, LabelPrompts, parse_sample
from vlp.data.shards import Shard, expand, iter_raw_samples

log = logging.getLogger(__name__)


@dataclass
class Source:
    shards: str | list[str]
    weight: float = 1.0
    name: str | None = None
    prompts: LabelPrompts | None = None  # label data: each sample's text is a prompt of its class, drawn per step


@dataclass
class StreamOptions:
    batch_size: int = 256
    shuffle_buffer: int = 2000  # 0 disables shuffling (shard order and samples both kept)
    seed: int = 0
    resampled: bool = False
    samples_per_epoch: int | None = None  # required in resampled mode
    drop_last: bool = False
    caption: str = "first"  # "first": the sample's txt; "random": one of json["captions"] per step
    captions_per_sample: int = 1  # > 1 (caption "random"): that many captions per image, text rows image-major
    require_text: bool = True
    image: ImageOptions = field(default_factory=ImageOptions)
    color_jitter: float = 0.0  # brightness, contrast, saturation factors in [1-j, 1+j] (vlp/data/augment.py)
    token_drop: float = 0.0  # each caption token but the start and end-of-text dropped with this probability
    cutout: int = 0  # side in pixels of a square of each image filled with the mean; 0 = off
    normalize: bool = True  # False keeps uint8 images (normalise on the accelerator instead)
    attributes: dict | None = None  # slot -> values: the batch's ``attributes`` tensor (vlp/data/batch.py)
    identity_batches: tuple[int, int] | None = None  # (P, K): P identities x K images per batch (module doc)

    def __post_init__(self):
        check_augment(self.color_jitter, self.token_drop, self.cutout, self.image.size)


def check_caption_options(caption: str, count: int, prefix: str = "") -> None:
    """``caption`` is "first" or "random"; ``count`` (captions per sample) is 1, or more with "random"."""
    if caption not in ("first", "random"):
        raise ValueError(f"{prefix}caption: {caption!r} is not 'first' or 'random'")
    if count < 1 or (count > 1 and caption != "random"):
        raise ValueError(f"{prefix}captions_per_sample: {count} needs to be 1, or more with "
                         f"{prefix}caption: random (it is {caption!r})")


def describe_shards(spec: str | list[str], shards: list[Shard]) -> str:
    """A shard spec as it reads in a message: the spec itself while short (braces keep thousands of shards short),
    else its first and last shard; with the shard count and the first damaged shard."""
    text = spec if isinstance(spec, str) else "::".join(spec)
    if len(text) > 160:
        text = f"{shards[0].url} ... {shards[-1].url}"
    counts = f"{len(shards)} shard{'' if len(shards) == 1 else 's'}"
    damaged = [s for s in shards if s.damage is not None]
    if damaged:
        more = f" and {len(damaged) - 1} more" if len(damaged) > 1 else ""
        counts += f"; damaged: {damaged[0].damage.describe(damaged[0].url, damaged[0].samples)}{more}"
    return f"{text} ({counts})"


def describe_skipped(skipped: Counter) -> str:
    """Skipped samples per reason, as in ``image_decode 2, no_text 14``."""
    return ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items()) if n) or "none"


def dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def split_range(n: int, part: int, parts: int) -> tuple[int, int]:
    return n * part // parts, n * (part + 1) // parts


def epoch_ranges(shards: list[Shard], slot: int, slots: int) -> list[tuple[Shard, int, int | None]]:
    """(shard, start, stop) pieces of the global sample sequence that belong to ``slot`` of ``slots``.

    A damaged shard's last piece (``stop == shard.samples``) is where its damage is counted, so one slot has it: an
    empty piece if the shard has no readable sample, for the first slot whose range reaches the shard's place."""
    if all(s.samples is not None for s in shards):
        total = sum(s.samples for s in shards)
        lo, hi = split_range(total, slot, slots)
        pieces, offset = [], 0
        for shard in shards:
            a, b = max(lo, offset), min(hi, offset + shard.samples)
            empty_damaged = shard.damage is not None and not shard.samples
            if a < b or (empty_damaged and (lo < offset or slot == 0) and offset <= hi):
                pieces.append((shard, 0, 0) if a >= b else (shard, a - offset, b - offset))
            offset += shard.samples
        return pieces
    return [(s, 0, None) for s in shards[slot::slots]]


class ShardStream(IterableDataset):
    """Batches (dicts) from one or several shard sources; see the module doc for the policies."""

    def __init__(self, sources: list[Source] | str, opts: StreamOptions, tokenizer: Callable | None = None,
                 rank: int | None = None, world_size: int | None = None):
        super().__init__()
        if isinstance(sources, str):
            sources = [Source(sources)]
        if not sources:
            raise ValueError("a stream needs at least one source")
        check_caption_options(opts.caption, opts.captions_per_sample)
        self.opts = opts
        self.tokenizer = tokenizer
        self.sources = sources
        self.shards = [expand(s.shards) for s in sources]
        self.weights = [float(s.weight) for s in sources]
        if any(w <= 0 for w in self.weights):
            raise ValueError(f"source weights must be positive, got {self.weights}")
        self.mixing = len(sources) > 1
        if (opts.resampled or self.mixing) and not opts.samples_per_epoch:
            raise ValueError("resampled or mixed streams need samples_per_epoch (they never run out on their own)")
        if opts.identity_batches and (opts.resampled or self.mixing):
            raise ValueError("identity_batches: streams in epochs from one source only (not resampled or mixed)")
        self.rank, self.world_size = (rank, world_size) if rank is not None else dist_info()
        self.decoder = ImageDecoder(opts.image)
        self.epoch = 0
        self.resume_from: dict[int, int] = {}  # slot -> raw samples to skip (set by Loader.load_state_dict)
        if not self.mixing and not opts.resampled:
            unknown = sum(s.samples is None for s in self.shards[0])
            if unknown:
                log.warning("%d of %d shards have no known sample count: splitting by whole shards",
                            unknown, len(self.shards[0]))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def num_samples(self) -> int | None:
        """Samples in one epoch over all ranks (None when unknown)."""
        if self.opts.resampled or self.mixing:
            return self.opts.samples_per_epoch
        counts = [s.samples for s in self.shards[0]]
        return None if None in counts or self.opts.identity_batches else sum(counts)

    def slot_samples(self, slot: int, slots: int) -> int | None:
        """Raw samples that slot ``slot`` of ``slots`` (rank * workers + worker) reads in one epoch, or None."""
        total = self.num_samples
        if total is None:
            return None
        lo, hi = split_range(total, slot, slots)
        return hi - lo

    # -- raw sample streams -------------------------------------------------------------------------------
    def _slot(self) -> tuple[int, int, int, int]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * workers + worker, self.world_size * workers, worker, workers

    def _epoch_samples(self, on_error, count: Callable[[str], None]) -> Iterator[dict]:
        shards = list(self.shards[0])
        if self.opts.shuffle_buffer:
            random.Random(self.opts.seed * 1_000_003 + self.epoch).shuffle(shards)
        slot, slots, _, _ = self._slot()
        for shard, start, stop in epoch_ranges(shards, slot, slots):
            if shard.damage is not None and stop == shard.samples:
                count(shard.damage.reason)  # expand warned already: the reader stops before the damage
            if start != stop:
                yield from iter_raw_samples(shard.url, start, stop, on_error)

    def _resampled(self, shards: list[Shard], rng: random.Random, on_error) -> Iterator[dict]:
        misses = 0  # draws in a row that gave no sample: a source with no readable sample must fail, not spin
        while True:
            shard = rng.choice(shards)
            misses += 1
            for sample in iter_raw_samples(shard.url, on_error=on_error):
                misses = 0
                yield sample
            if misses > 2 * len(shards) + 8:
                raise ValueError(f"no readable sample in {misses} draws from the {len(shards)} shards starting "
                                 f"with {shards[0].url}: they are empty or unreadable")

    def _mixed_samples(self, rng: random.Random, on_error) -> Iterator[tuple[int, dict]]:
        streams = [self._resampled(shards, random.Random(rng.random()), on_error) for shards in self.shards]
        total = sum(self.weights)
        credit = [0.0] * len(streams)
        while True:
            for i, w in enumerate(self.weights):
                credit[i] += w / total
            i = max(range(len(streams)), key=credit.__getitem__)
            credit[i] -= 1.0
            yield i, next(streams[i])

    # -- batches -------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        """Per worker: raw samples -> shuffle buffer -> (skip what a resumed run already consumed) -> decode ->
        batches. Decoding draws from a generator seeded by the sample's position in this sequence, so skipping
        needs no decoding and a resumed stream continues exactly where the interrupted one stopped."""
        opts = self.opts
        slot, slots, _, _ = self._slot()
        rng = random.Random(f"{opts.seed}/{self.epoch}/{slot}")
        skipped: Counter = Counter()

        def on_error(reason, where):
            skipped[reason] += 1
            log.warning("%s: %s", reason, where)

        def count(reason):
            skipped[reason] += 1

        if opts.resampled or self.mixing:
            lo, hi = split_range(opts.samples_per_epoch, slot, slots)
            raw: Iterator = itertools.islice(self._mixed_samples(rng, on_error), hi - lo)
        else:
            raw = ((0, s) for s in self._epoch_samples(on_error, count))
        if opts.shuffle_buffer:
            raw = shuffled(raw, opts.shuffle_buffer, rng)
        if opts.identity_batches:
            yield from self._identity_batches(raw, skipped, slot)
            return
        position = self.resume_from.get(slot, 0)
        for _ in itertools.islice(raw, position):
            pass
        skipped.clear()  # what reading the skipped samples met, the interrupted run's batches counted

        batch: list[dict] = []
        for source, sample in raw:
            position += 1
            try:
                parsed = self._decode(sample, random.Random(f"{opts.seed}/{self.epoch}/{slot}/{position}"),
                                      self.sources[source].prompts)
            except BadSample as e:
                skipped[e.reason] += 1
                continue
            parsed["source"] = source
            batch.append(parsed)
            if len(batch) == opts.batch_size:
                yield self._collate(batch, skipped, slot, position)
                batch = []
        if batch and not opts.drop_last:
            yield self._collate(batch, skipped, slot, position)
        # Always end with a marker: the Loader needs it to keep its batch order well defined (see Loader).
        yield {"skipped": dict(skipped), "worker": slot, "position": position, "end": True}

    def _identity_batches(self, raw: Iterator, skipped: Counter, slot: int) -> Iterator[dict]:
        """P x K batches of this worker's samples (module doc); positions count batches."""
        opts = self.opts
        made = self.resume_from.get(slot, 0)
        groups = identity_groups((sample for _, sample in raw), *opts.identity_batches, skipped)
        for _ in itertools.islice(groups, made):
            pass
        skipped.clear()  # the interrupted run's batches counted what reading the skipped part met
        for group in groups:
            made += 1
            parsed = []
            for j, sample in enumerate(group):
                try:
                    parsed.append({**self._decode(sample, random.Random(f"{opts.seed}/{self.epoch}/{slot}/{made}/{j}")),
                                   "source": 0})
                except BadSample as e:
                    skipped[e.reason] += 1
            if parsed:
                yield self._collate(parsed, skipped, slot, made)
        yield {"skipped": dict(skipped), "worker": slot, "position": made, "end": True}

    def _decode(self, sample: dict, rng: random.Random, prompts: LabelPrompts | None = None) -> dict:
        parsed = parse_sample(sample, self.opts.require_text, self.opts.caption, rng, self.opts.captions_per_sample,
                              prompts)
        parsed["image"] = self.decoder(parsed["image"], rng)
        return parsed

    def _collate(self, batch: list[dict], skipped: Counter, slot: int, position: int) -> dict:
        opts = self.opts
        texts = [s["texts"] for s in batch]
        tokens = self.tokenizer([t for group in texts for t in group]) if self.tokenizer is not None else None
        seed = None
        if augmenting(opts):  # seeded by the batch's place in this worker's sequence
            seed = random.Random(f"{opts.seed}/{self.epoch}/{slot}/{position}/augment").getrandbits(62)
        out = collate(batch, texts, torch.stack([s["image"] for s in batch]), tokens, opts, seed)
        out["skipped"], out["worker"] = dict(skipped), slot
        out["position"] = position  # raw samples this worker has consumed, up to and including this batch
        skipped.clear()
        return out


def identity_groups(samples: Iterator[dict], p: int, k: int, skipped: Counter) -> Iterator[list[dict]]:
    """Raw samples in P x K batches (lists, identity-major): a batch as soon as K-groups of P distinct identities are
    ready, the oldest ready groups first; what is left at the end, and samples without an identity, counted in
    ``skipped``. A function of the sample order only: the same samples give the same batches."""
    pending: dict[int, list[dict]] = {}
    ready: list[tuple[int, list[dict]]] = []  # (identity, K samples), oldest first
    for sample in samples:
        try:
            identity = int(json.loads(sample["json"]).get("identity", -1)) if "json" in sample else -1
        except (ValueError, TypeError, AttributeError):
            identity = -1
        if identity < 0:
            skipped["no_identity"] += 1
            continue
        group = pending.setdefault(identity, [])
        group.append(sample)
        if len(group) < k:
            continue
        ready.append((identity, pending.pop(identity)))
        chosen: dict[int, int] = {}  # identity -> index in ready
        for i, (person, _) in enumerate(ready):
            chosen.setdefault(person, i)
            if len(chosen) == p:
                break
        if len(chosen) == p:
            taken = set(chosen.values())
            yield [s for i in sorted(taken) for s in ready[i][1]]
            ready = [g for i, g in enumerate(ready) if i not in taken]
    left = sum(len(g) for g in pending.values()) + sum(len(g) for _, g in ready)
    if left:
        skipped["identity_leftover"] += left


def shuffled(samples: Iterator, size: int, rng: random.Random) -> Iterator:
    """Shuffle buffer: keep ``size`` samples, emit a random one as each new one arrives."""
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = sample
    rng.shuffle(buffer)
    yield from buffer


def _as_is(batch: dict) -> dict:
    # Batches are complete when a worker yields them; DataLoader's default_convert would only walk them again.
    return batch


def _die_with_loader(worker_id: int) -> None:
    # DataLoader's workers look for a dead parent only between batches, and one whose parent is gone exits by
    # joining the thread that feeds its result pipe: once the pipe is full (its reader was the killed trainer;
    # the sibling workers keep it open) that join does not return, and the worker lives on, holding its memory.
    die_with_parent(multiprocessing.parent_process().pid)


class Loader:
    """A DataLoader over a :class:`ShardStream` with a resumable position and summed bad-sample counts.

    Batches are yielded in a fixed order of their own, round-robin over this rank's workers (skipping those
    that have ended), whatever order the DataLoader delivers them in. That order, the epoch and each worker's
    position are the whole data state: ``state_dict()`` after any batch, ``load_state_dict()`` on a new Loader,
    and iteration continues with exactly the batch that would have come next.

    With workers and known epoch sizes, the next epoch's workers start (``lookahead``) once the current epoch has
    at most two prefetch windows of samples left, so that the next epoch's first batches are ready when it
    begins instead of after a fork and a shuffle-buffer fill. That prefetched epoch starts fresh; a Loader whose
    state is loaded or whose epoch changes otherwise discards it. What the workers produce does not depend on it.

    Workers die with the process that iterates the Loader, ``kill -9`` included. On Linux they die with the *thread*
    that started them (the one that iterates, lookahead workers included), so iterate from a thread that outlives
    the iteration, such as the main thread.
    """

    def __init__(self, stream: ShardStream, workers: int = 2, prefetch: int = 4, pin_memory: bool = False,
                 lookahead: bool = True):
        self.stream = stream
        self.workers = workers
        self.prefetch = prefetch
        self.lookahead = lookahead and workers > 0
        self.skipped: Counter = Counter()
        self.epoch = stream.epoch
        self._state = self._fresh_state()
        self._ahead: tuple[int, Iterator] | None = None  # (epoch, its DataLoader iterator): workers running
        # The loader's own generator: starting workers draws their base seed from it, not from torch's global RNG
        # (which a lookahead would otherwise advance at a point that depends on timing of the data position).
        self.loader = DataLoader(stream, batch_size=None, collate_fn=_as_is, num_workers=workers,
                                 pin_memory=pin_memory, prefetch_factor=prefetch if workers > 0 else None,
                                 worker_init_fn=_die_with_loader,
                                 generator=torch.Generator().manual_seed(stream.opts.seed))

    def _fresh_state(self) -> dict:
        return {"positions": {}, "next": 0, "ended": []}

    def at_epoch_start(self) -> bool:
        """Whether iterating now starts epoch ``self.epoch`` from its beginning: False part-way through it, and after
        loading a state saved part-way (also one saved after its last batch, whose iteration yields nothing)."""
        state = self._state
        return not state["positions"] and not state["ended"] and state["next"] == 0

    def describe(self) -> str:
        """The shards read and the samples skipped so far per reason, for messages about this data."""
        stream = self.stream
        parts = [(f"{source.name}: " if source.name else "") + describe_shards(source.shards, shards)
                 for source, shards in zip(stream.sources, stream.shards)]
        return f"shards {'; '.join(parts)}; skipped so far: {describe_skipped(self.skipped)}"

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._state = epoch, self._fresh_state()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "positions": dict(self._state["positions"]), "next": self._state["next"],
                "ended": list(self._state["ended"]), "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self._state = {"positions": {int(k): int(v) for k, v in state["positions"].items()},
                       "next": int(state["next"]), "ended": [int(w) for w in state["ended"]]}
        self.skipped = Counter(state.get("skipped", {}))

    def _slots(self) -> tuple[list[int], int]:
        workers = max(self.workers, 1)
        rank0 = self.stream.rank * workers
        return [rank0 + w for w in range(workers)], self.stream.world_size * workers

    def batches_per_epoch(self) -> int | None:
        """Batches this rank yields in one epoch if no sample is bad (exact split arithmetic), or None."""
        order, slots = self._slots()
        counts = [self.stream.slot_samples(slot, slots) for slot in order]
        if None in counts:
            return None
        size = self.stream.opts.batch_size
        return sum(n // size if self.stream.opts.drop_last else -(-n // size) for n in counts)

    def close(self) -> None:
        """Stop the workers of a prefetched next epoch (a run that ends mid-epoch leaves them waiting)."""
        self._ahead = None

    def _start(self, epoch: int, positions: dict) -> Iterator:
        # Workers fork (and copy the stream) when the iterator is created: later changes here do not reach them.
        self.stream.set_epoch(epoch)
        self.stream.resume_from = dict(positions)
        return iter(self.loader)

    def __iter__(self) -> Iterator[dict]:
        state = self._state
        ahead, self._ahead = self._ahead, None
        source = ahead[1] if ahead is not None and ahead[0] == self.epoch and self.at_epoch_start() else None
        del ahead  # a prefetched epoch that is not this one: its workers shut down
        if source is None:
            source = self._start(self.epoch, state["positions"])
        order, slots = self._slots()
        sizes = [self.stream.slot_samples(slot, slots) for slot in order]
        window = 2 * self.prefetch * len(order) * self.stream.opts.batch_size
        pending: dict[int, list[dict]] = {w: [] for w in order}
        ended = set(state["ended"])

        def due() -> int | None:
            for step in range(len(order)):
                w = order[(state["next"] + step) % len(order)]
                if w not in ended or pending[w]:
                    return w
            return None

        for batch in source:
            if self.lookahead and self._ahead is None and None not in sizes and \
                    sum(n - state["positions"].get(w, 0) for w, n in zip(order, sizes)) <= window:
                self._ahead = (self.epoch + 1, self._start(self.epoch + 1, {}))
            pending[batch["worker"]].append(batch)
            while (w := due()) is not None and pending[w]:
                item = pending[w].pop(0)
                self.skipped.update(item.pop("skipped"))
                if item.pop("end", False):
                    ended.add(w)
                    state["ended"] = sorted(ended)
                    continue
                state["positions"][w] = item.pop("position")
                item.pop("worker")
                state["next"] = (order.index(w) + 1) % len(order)
                yield item
        self.set_epoch(self.epoch + 1)
