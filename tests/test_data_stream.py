"""Streaming: splitting over ranks and workers, shuffling, resampling, mixing, bad samples, shard specs."""
from __future__ import annotations

import io
import itertools
import json
import logging
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import jpeg_bytes, make_sample, make_shard_set, write_tar
from vlp.data import Loader, ShardSpecError, ShardStream, Source, StreamOptions, expand, iter_raw_samples
from vlp.data.preprocess import ImageOptions
from vlp.data.stream import epoch_ranges


def options(**kw) -> StreamOptions:
    kw.setdefault("batch_size", 8)
    kw.setdefault("shuffle_buffer", 0)
    kw.setdefault("image", ImageOptions(size=16))
    return StreamOptions(**kw)


def uids_of(stream: ShardStream, workers: int) -> list[str]:
    return [u for batch in Loader(stream, workers=workers) for u in batch["uid"]]


@pytest.mark.parametrize("sizes", [[13, 7, 20, 5, 9, 11, 2], [37], [3, 3]], ids=["7-uneven", "1-shard", "2-tiny"])
def test_two_ranks_two_workers_read_every_sample_once(tmp_path, sizes):
    expected = make_shard_set(tmp_path, sizes)
    per_rank = []
    for rank in range(2):
        stream = ShardStream(f"{tmp_path}/{{00000..{len(sizes) - 1:05d}}}.tar", options(shuffle_buffer=50, seed=3),
                             rank=rank, world_size=2)
        per_rank.append(uids_of(stream, workers=2))
    seen = per_rank[0] + per_rank[1]
    assert sorted(seen) == sorted(expected), "a sample was dropped or duplicated"
    assert abs(len(per_rank[0]) - len(per_rank[1])) <= 1, "ranks must get the same number of samples (+-1)"


def test_fewer_shards_than_slots_keeps_every_worker_busy(tmp_path):
    make_shard_set(tmp_path, [40])
    pieces = [epoch_ranges(expand(str(tmp_path)), slot, 4) for slot in range(4)]
    assert [sum(b - a for _, a, b in p) for p in pieces] == [10, 10, 10, 10]


def test_unknown_sizes_fall_back_to_whole_shards_round_robin(tmp_path):
    expected = make_shard_set(tmp_path, [5, 6, 7], manifest=False)
    spec = f"pipe:cat {tmp_path}/{{00000..00002}}.tar"
    assert all(s.samples is None for s in expand(spec))
    seen = []
    for rank in range(2):
        seen += uids_of(ShardStream(spec, options(), rank=rank, world_size=2), workers=2)
    assert sorted(seen) == sorted(expected)


def test_local_tars_without_manifest_are_counted_from_headers(tmp_path):
    make_shard_set(tmp_path, [4, 9], manifest=False)
    assert [s.samples for s in expand(str(tmp_path))] == [4, 9]


def damage_tar(path: Path, how: str, sample: int = 6) -> None:
    """Damage a tar of ``make_shard_set`` at the second member (``.txt``) of sample ``sample``: ``cut`` inside its
    data, ``cut_header`` inside its header, ``garbage`` written over its header; ``not_a_tar`` replaces the file."""
    if how == "not_a_tar":
        path.write_bytes(b"this is not a tar archive" * 40)
        return
    with tarfile.open(path) as tf:
        member = [m for m in tf.getmembers() if m.name.endswith(".txt")][sample]
    data = path.read_bytes()
    if how == "cut":
        data = data[:member.offset_data + member.size // 2]
    elif how == "cut_header":
        data = data[:member.offset + 200]
    else:
        data = data[:member.offset] + b"\xa5" * 512 + data[member.offset + 512:]
    path.write_bytes(data)


DAMAGE = {"cut": ("truncated_tar", 6), "cut_header": ("truncated_tar", 6), "garbage": ("corrupt_tar", 6),
          "not_a_tar": ("unreadable_shard", 0)}  # how -> (reason, samples readable before the damage)


@pytest.mark.parametrize("how", list(DAMAGE))
def test_a_damaged_local_tar_counts_the_samples_before_the_damage_and_says_so_once(tmp_path, caplog, how):
    reason, readable = DAMAGE[how]
    make_shard_set(tmp_path, [10, 12, 9], manifest=False)
    damage_tar(tmp_path / "00001.tar", how)
    with caplog.at_level(logging.WARNING):
        shards = expand(str(tmp_path))
    assert [s.samples for s in shards] == [10, readable, 9]
    assert [len(list(iter_raw_samples(s.url))) for s in shards] == [10, readable, 9], "the reader must agree"
    assert shards[0].damage is None and shards[1].damage.reason == reason
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(tmp_path / "00001.tar") in warnings[0]
    assert reason in warnings[0] and f"{readable} readable samples" in warnings[0]


@pytest.mark.parametrize("how", ["cut", "garbage", "not_a_tar"])
def test_a_damaged_shard_is_read_exactly_once_and_its_damage_counted_once_per_epoch(tmp_path, how):
    reason, readable = DAMAGE[how]
    uids = make_shard_set(tmp_path, [10, 12, 9], manifest=False)
    damage_tar(tmp_path / "00001.tar", how)
    per_rank, skipped = [], Counter()
    for rank in range(2):
        stream = ShardStream(str(tmp_path), options(batch_size=4, shuffle_buffer=20, seed=1), rank=rank, world_size=2)
        loader = Loader(stream, workers=2, lookahead=False)
        batches = [b["uid"] for b in loader]
        assert len(batches) == loader.batches_per_epoch(), "the epoch length must be what is readable"
        per_rank.append([u for b in batches for u in b])
        skipped += loader.skipped
    assert sorted(per_rank[0] + per_rank[1]) == sorted(uids[:10 + readable] + uids[22:])
    assert abs(len(per_rank[0]) - len(per_rank[1])) <= 1
    assert skipped == Counter({reason: 1})
    assert f"damaged: {tmp_path / '00001.tar'} ({reason}" in loader.describe()


@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_resumed_past_a_damaged_shard_is_the_same_and_counts_the_damage_once(tmp_path, workers):
    make_shard_set(tmp_path, [10, 12, 9], manifest=False)
    damage_tar(tmp_path / "00001.tar", "cut")

    def loader():
        stream = ShardStream(str(tmp_path), options(batch_size=4, shuffle_buffer=6, seed=2))
        return Loader(stream, workers=workers, lookahead=False)

    full = loader()
    keys = [b["key"] for b in full]
    assert len(keys) == loader().batches_per_epoch() and full.skipped == Counter(truncated_tar=1)
    for cut in range(1, len(keys)):
        first = loader()
        head = [b["key"] for b in itertools.islice(first, cut)]
        resumed = loader()
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert head + [b["key"] for b in resumed] == keys
        assert resumed.skipped == full.skipped, f"interrupted after batch {cut}"


def test_shuffle_is_seeded_and_changes_with_the_epoch(tmp_path):
    make_shard_set(tmp_path, [30, 30, 30])

    def order(seed, epoch):
        stream = ShardStream(str(tmp_path), options(shuffle_buffer=40, seed=seed))
        stream.set_epoch(epoch)
        return uids_of(stream, workers=0)

    a = order(0, 0)
    assert a == order(0, 0)
    assert a != order(0, 1) and a != order(1, 0)
    assert sorted(a) == sorted(order(0, 1))
    assert a != sorted(a)


def test_resampled_epoch_has_exactly_samples_per_epoch(tmp_path):
    make_shard_set(tmp_path, [10, 10])
    stream = ShardStream(str(tmp_path), options(resampled=True, samples_per_epoch=103), rank=0, world_size=1)
    uids = uids_of(stream, workers=2)
    assert len(uids) == 103
    assert len(set(uids)) <= 20


def test_weighted_mixing_follows_the_weights(tmp_path):
    make_shard_set(tmp_path / "captions", [50, 50], prefix="c")
    make_shard_set(tmp_path / "labels", [20], prefix="l")
    sources = [Source(str(tmp_path / "captions"), 0.7), Source(str(tmp_path / "labels"), 0.3)]
    stream = ShardStream(sources, options(batch_size=64, shuffle_buffer=100, samples_per_epoch=2000))
    counts = Counter()
    for batch in Loader(stream, workers=2):
        counts.update(batch["source"].tolist())
    assert sum(counts.values()) == 2000
    assert abs(counts[0] / 2000 - 0.7) < 0.02 and abs(counts[1] / 2000 - 0.3) < 0.02


def test_resampled_streams_need_an_epoch_length(tmp_path):
    make_shard_set(tmp_path, [3])
    with pytest.raises(ValueError, match="samples_per_epoch"):
        ShardStream(str(tmp_path), options(resampled=True))


def test_bad_samples_are_skipped_and_counted_per_reason(tmp_path):
    good = [make_sample(f"g{i}", i) for i in range(6)]
    broken_image = {"__key__": "b0", "jpg": jpeg_bytes(99)[:200], "txt": b"cut image"}
    no_text = {"__key__": "b1", "jpg": jpeg_bytes(98)}
    latin1 = {"__key__": "b2", "jpg": jpeg_bytes(97), "txt": "caf\xe9".encode("latin-1")}
    write_tar(tmp_path / "00000.tar", good[:3] + [broken_image, no_text, latin1])
    write_tar(tmp_path / "00001.tar", good[3:])
    data = (tmp_path / "00001.tar").read_bytes()
    (tmp_path / "00001.tar").write_bytes(data[: len(data) // 2])  # truncated mid-sample
    loader = Loader(ShardStream(str(tmp_path), options()), workers=2)
    keys = [k for batch in loader for k in batch["key"]]
    assert set(keys) >= {"g0", "g1", "g2"} and not set(keys) & {"b0", "b1", "b2"}
    assert loader.skipped["image_decode"] == 1
    assert loader.skipped["no_text"] == 1
    assert loader.skipped["text_not_utf8"] == 1
    assert loader.skipped["truncated_tar"] == 1
    assert 3 < len(keys) < 6, "samples before the truncation are kept, the cut one is not"


def test_batches_carry_metadata_and_tokens(tmp_path):
    import open_clip

    import vlp.models  # noqa: F401 - registers vlp-tiny-32

    make_shard_set(tmp_path, [5], kind="label", label=4, identity=7)
    tokenizer = open_clip.get_tokenizer("vlp-tiny-32")
    batch = next(iter(Loader(ShardStream(str(tmp_path), options(), tokenizer), workers=0)))
    assert batch["image"].shape == (5, 3, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["text"].shape == (5, 32) and batch["text"].dtype == torch.long
    assert batch["label"].tolist() == [4] * 5 and batch["identity"].tolist() == [7] * 5
    assert batch["kind"] == ["label"] * 5 and batch["uid"][0] == f"{0:032x}"
    assert batch["text"][0].tolist() == tokenizer(["caption s000000"])[0].tolist()


def test_shard_specs(tmp_path):
    make_shard_set(tmp_path / "a", [2, 3])
    make_shard_set(tmp_path / "b", [4])
    shards = expand(f"{tmp_path}/a/{{00000..00001}}.tar::{tmp_path}/b/00000.tar")
    assert [s.samples for s in shards] == [2, 3, 4]
    assert len(uids_of(ShardStream(f"file://{tmp_path}/b/00000.tar", options()), workers=0)) == 4
    import fsspec

    with fsspec.open("memory://bucket/00000.tar", "wb") as f:  # any fsspec URL (s3://, gs://, ...)
        f.write((tmp_path / "b" / "00000.tar").read_bytes())
    assert len(uids_of(ShardStream("memory://bucket/{00000..00000}.tar", options()), workers=0)) == 4
    with pytest.raises(ShardSpecError, match=r"00002.tar' does not exist \(and 5 more\)"):
        expand(f"{tmp_path}/a/{{00000..00007}}.tar")
    with pytest.raises(ShardSpecError, match="matches no file"):
        expand(f"{tmp_path}/nothing-*.tar")


def test_bad_manifest_names_the_file(tmp_path):
    make_shard_set(tmp_path, [2])
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ShardSpecError, match="manifest.json"):
        expand(str(tmp_path))


def test_captions_drawn_at_random_cover_every_caption(tmp_path):
    captions = ["one", "two", "three"]
    write_tar(tmp_path / "00000.tar", [{"__key__": "k", "jpg": jpeg_bytes(1), "txt": b"one",
                                        "json": json.dumps({"captions": captions}).encode()}])
    seen = set()
    for epoch in range(30):
        stream = ShardStream(str(tmp_path), options(caption="random"))
        stream.set_epoch(epoch)
        seen.update(c for batch in Loader(stream, workers=0) for c in batch["caption"])
    assert seen == set(captions)


def test_several_captions_per_sample_come_image_major_and_distinct(tmp_path):
    import open_clip

    import vlp.models  # noqa: F401 - registers vlp-tiny-32

    counts = [5, 4, 2]  # the last sample has fewer captions than asked for: both, then one of them again
    write_tar(tmp_path / "00000.tar", [{"__key__": f"k{i}", "jpg": jpeg_bytes(i), "txt": b"x",
                                        "json": json.dumps({"captions": [f"img{i} c{c}" for c in range(n)]}).encode()}
                                       for i, n in enumerate(counts)])
    tokenizer = open_clip.get_tokenizer("vlp-tiny-32")
    stream = ShardStream(str(tmp_path), options(caption="random", captions_per_sample=3), tokenizer)
    batch = next(iter(Loader(stream, workers=0)))
    assert batch["image"].shape[0] == 3 and batch["text"].shape == (9, 32)
    for i, captions in enumerate(batch["caption"]):
        assert len(captions) == 3 and all(c.startswith(f"img{i} ") for c in captions)
        assert len(set(captions)) == min(3, counts[i])
        for j, caption in enumerate(captions):  # text row 3*i + j is image i's j-th caption
            assert batch["text"][3 * i + j].tolist() == tokenizer([caption])[0].tolist()
    with pytest.raises(ValueError, match="captions_per_sample"):
        ShardStream(str(tmp_path), options(caption="first", captions_per_sample=2))


def test_reads_tars_from_a_pipe_with_directories_and_odd_members(tmp_path):
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w") as tf:
        for name, data in [("sub/a.jpg", jpeg_bytes(1)), ("sub/a.txt", b"x"), ("__meta__.json", b"{}")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    batch = next(iter(Loader(ShardStream(f"pipe:cat {path}", options()), workers=0)))
    assert batch["key"] == ["sub/a"] and batch["caption"] == ["x"]


@pytest.mark.parametrize("workers,augment", [(0, False), (2, False), (2, True)])
def test_loader_resumes_exactly_mid_epoch(tmp_path, monkeypatch, workers, augment):
    import open_clip

    import vlp.models  # noqa: F401 - registers vlp-tiny-32

    make_shard_set(tmp_path, [23, 17, 30])
    broken = {"__key__": "bad", "jpg": b"not a jpeg", "txt": b"x"}
    write_tar(tmp_path / "00003.tar", [broken] + [make_sample(f"z{i}", 100 + i) for i in range(5)])
    spec = f"{tmp_path}/{{00000..00003}}.tar"
    extra = {"color_jitter": 0.3, "token_drop": 0.3} if augment else {}

    def loader(**kw):
        opts = options(shuffle_buffer=16, seed=5, image=ImageOptions(size=16, train=True), **{**extra, **kw})
        return Loader(ShardStream(spec, opts, open_clip.get_tokenizer("vlp-tiny-32")), workers=workers)

    def entries(batches):
        return [(b["key"], b["image"], b["text"]) for b in batches]

    full = loader()
    full.set_epoch(1)
    reference = entries(full)
    first = loader()
    first.set_epoch(1)
    head = []
    for batch in first:
        head += entries([batch])
        if len(head) == 4:
            break
    state = first.state_dict()
    resumed = loader()
    resumed.load_state_dict(json.loads(json.dumps(state)))  # the state survives a JSON round trip
    tail = entries(resumed)
    assert [e[0] for e in head + tail] == [e[0] for e in reference]
    assert all(torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) for a, b in zip(head + tail, reference)), \
        "augmentation must replay"
    assert resumed.skipped["image_decode"] == 1 and resumed.epoch == 2
    if augment:  # the same samples and crops, with colours jittered and caption tokens dropped
        plain = loader(color_jitter=0.0, token_drop=0.0)
        plain.set_epoch(1)
        plain = entries(plain)
        assert [e[0] for e in plain] == [e[0] for e in reference]
        assert not any(torch.equal(a[1], b[1]) for a, b in zip(plain, reference))
        assert sum(int((b[2] != 0).sum()) for b in reference) < sum(int((a[2] != 0).sum()) for a in plain)
        # each batch draws its own augmentation (in-process here, so the seeds can be watched)
        import vlp.data.batch as batch_module

        seeds, real = [], batch_module.augment_batch
        monkeypatch.setattr(batch_module, "augment_batch", lambda *a: seeds.append(a[-1]) or real(*a))
        watched = Loader(loader().stream, workers=0)
        watched.set_epoch(1)
        assert len(entries(watched)) == len(seeds) > 5 and len(set(seeds)) == len(seeds)
        with pytest.raises(ValueError, match="data.token_drop"):
            loader(token_drop=1.0)


def test_the_next_epoch_starts_early_and_yields_the_same_batches(tmp_path):
    make_shard_set(tmp_path, [30, 34])  # 64 samples: 4 batches of 8 per worker and epoch

    def run(lookahead: bool):
        loader = Loader(ShardStream(str(tmp_path), options(shuffle_buffer=16, seed=3,
                                                           image=ImageOptions(size=16, train=True))),
                        workers=2, prefetch=1, lookahead=lookahead)
        started, start = [], loader._start
        loader._start = lambda epoch, positions: started.append(epoch) or start(epoch, positions)
        batches, early = [], []
        for epoch in range(3):
            loader.set_epoch(epoch)
            for batch in loader:
                batches.append((batch["key"], batch["image"]))
                early.append(loader._ahead is not None)
        return batches, started, early

    ahead, started, early = run(True)
    plain, plain_started, plain_early = run(False)
    assert [k for k, _ in ahead] == [k for k, _ in plain] and len(plain) == 3 * 8
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(ahead, plain))
    # Each epoch's workers started once, during the epoch before (the last one for an epoch never run).
    assert started == [0, 1, 2, 3] and plain_started == [0, 1, 2]
    assert sum(early) >= 3 * 3 and not any(plain_early)  # 2 prefetch windows = 32 of 64 samples: 4 batches early


def test_resampling_unreadable_shards_fails_instead_of_spinning(tmp_path):
    make_shard_set(tmp_path, [3, 3])
    for path in tmp_path.glob("*.tar"):
        path.write_bytes(b"this is not a tar archive" * 40)
    stream = ShardStream(str(tmp_path), options(resampled=True, samples_per_epoch=10))
    with pytest.raises(ValueError, match="no readable sample in .* draws from the 2 shards"):
        list(Loader(stream, workers=0))


def test_at_epoch_start_is_true_only_before_an_epoch_is_touched(tmp_path):
    make_shard_set(tmp_path, [9, 8])  # 17 samples: 3 batches of 8 (the last one of 1)
    loader = Loader(ShardStream(str(tmp_path), options(shuffle_buffer=4, seed=1)), workers=0)
    assert loader.at_epoch_start()
    batches = iter(loader)
    next(batches)
    assert not loader.at_epoch_start() and loader.epoch == 0
    mid = loader.state_dict()
    rest = list(batches)
    last = None
    for batch in loader:  # epoch 1 ran to its end: keep the state after its last batch
        last = loader.state_dict()
    assert len(rest) == 2 and loader.epoch == 2 and loader.at_epoch_start()

    resumed = Loader(ShardStream(str(tmp_path), options(shuffle_buffer=4, seed=1)), workers=0)
    resumed.load_state_dict(mid)
    assert not resumed.at_epoch_start() and [b["uid"] for b in resumed] == [b["uid"] for b in rest]
    at_end = Loader(ShardStream(str(tmp_path), options(shuffle_buffer=4, seed=1)), workers=0)
    at_end.load_state_dict(last)
    assert last["epoch"] == 1 and not at_end.at_epoch_start()
    assert list(at_end) == [] and at_end.epoch == 2 and at_end.at_epoch_start()  # nothing left: the next epoch
    at_end.set_epoch(1)
    assert at_end.at_epoch_start() and len(list(at_end)) == 3  # set_epoch to another epoch starts it afresh


def test_an_epoch_of_skipped_samples_yields_nothing_and_describe_names_shards_and_reasons(tmp_path):
    identity = [{"__key__": f"p{i}", "jpg": jpeg_bytes(i), "json": json.dumps({"identity": i}).encode()}
                for i in range(5)]  # identity shards carry no text: with require_text every sample is skipped
    write_tar(tmp_path / "00000.tar", identity[:3] + [{"__key__": "bad", "jpg": b"not a jpeg", "txt": b"x"}])
    write_tar(tmp_path / "00001.tar", identity[3:])
    spec = f"{tmp_path}/{{00000..00001}}.tar"
    loader = Loader(ShardStream(spec, options()), workers=2)
    assert loader.describe() == f"shards {spec} (2 shards); skipped so far: none"
    assert loader.at_epoch_start() and list(loader) == []
    assert loader.describe() == f"shards {spec} (2 shards); skipped so far: image_decode 1, no_text 5"

    many = tmp_path / "many"
    make_shard_set(many, [1] * 40)
    urls = [str(p) for p in sorted(many.glob("*.tar"))]  # a list of 40 paths: named by its first and last shard
    assert Loader(ShardStream([Source(urls)], options()), workers=0).describe() == \
        f"shards {urls[0]} ... {urls[-1]} (40 shards); skipped so far: none"
    mixed = ShardStream([Source(spec, 0.5, "people"), Source(urls[0], 0.5, "captions")],
                        options(samples_per_epoch=4))
    assert Loader(mixed, workers=0).describe() == \
        f"shards people: {spec} (2 shards); captions: {urls[0]} (1 shard); skipped so far: none"
