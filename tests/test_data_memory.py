"""data.in_memory: every sample once per epoch over ranks, exact resume, captions, crops close to PIL's, bad samples."""
from __future__ import annotations

import io
import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from conftest import make_sample, make_shard_set, write_tar
from vlp.data.memory import MemoryLoader
from vlp.data.preprocess import ImageOptions
from vlp.data.stream import StreamOptions

TOKENIZER = open_clip.get_tokenizer("ViT-B-32")


def options(**kw) -> StreamOptions:
    image = ImageOptions(size=kw.pop("size", 16), scale=kw.pop("scale", (0.5, 1.0)), hflip=kw.pop("hflip", True))
    return StreamOptions(batch_size=kw.pop("batch_size", 8), seed=kw.pop("seed", 3), image=image, **kw)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory-shards")
    uids = make_shard_set(root, [13, 12])
    return str(root / "{00000..00001}.tar"), uids


def test_every_sample_once_per_epoch_over_two_ranks_and_a_new_order_each_epoch(shards):
    spec, uids = shards
    loaders = [MemoryLoader(spec, options(), TOKENIZER, rank=r, world_size=2) for r in range(2)]
    assert [ld.batches_per_epoch() for ld in loaders] == [2, 2]  # 13 and 12 samples in batches of 8
    epochs = []
    for epoch in range(2):
        seen = [[u for b in ld for u in b["uid"]] for ld in loaders]
        assert abs(len(seen[0]) - len(seen[1])) <= 1
        assert sorted(seen[0] + seen[1]) == sorted(uids)
        epochs.append(seen[0] + seen[1])
        assert all(ld.epoch == epoch + 1 for ld in loaders)
    assert epochs[0] != epochs[1]


def test_a_resumed_loader_gives_exactly_the_batches_that_came_next(shards):
    spec, _ = shards
    full = MemoryLoader(spec, options(batch_size=4), TOKENIZER)
    batches = [b for _ in range(2) for b in full]  # two epochs of 7 batches
    part = MemoryLoader(spec, options(batch_size=4), TOKENIZER)
    it = iter(part)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(part.state_dict()))  # as a checkpoint stores it
    resumed = MemoryLoader(spec, options(batch_size=4), TOKENIZER)
    resumed.load_state_dict(state)
    rest = list(resumed) + list(resumed)
    for a, b in zip(batches[3:], rest):
        assert a["uid"] == b["uid"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["text"], b["text"])
    assert len(rest) == 7 - 3 + 7


def test_random_captions_come_from_the_samples_list_and_k_per_image_are_distinct(tmp_path):
    caps = [f"caption {i} of sample {{}}" for i in range(5)]
    samples = [make_sample(f"k{i:03d}", i, captions=[c.format(i) for c in caps]) for i in range(10)]
    write_tar(tmp_path / "a.tar", samples)
    loader = MemoryLoader(str(tmp_path / "a.tar"), options(caption="random", captions_per_sample=3, batch_size=10),
                          TOKENIZER)
    batch = next(iter(loader))
    assert batch["text"].shape[0] == 30  # image-major: 3 text rows per image
    for key, texts, row in zip(batch["key"], batch["caption"], range(10)):
        number = int(key[1:])
        assert len(set(texts)) == 3 and all(t.endswith(f"sample {number}") for t in texts)
        assert torch.equal(batch["text"][3 * row], TOKENIZER([texts[0]])[0])


def test_the_crop_is_close_to_pil_bicubic_of_the_same_box(tmp_path):
    # a smooth image (gradients and a disc), as photos are at this scale; the crop covers the whole image
    y, x = np.mgrid[0:64, 0:64]
    img = np.stack([x * 4, y * 4, 255 * ((x - 30) ** 2 + (y - 34) ** 2 < 200)], -1).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    write_tar(tmp_path / "a.tar", [{"__key__": "x", "png": buf.getvalue(), "txt": b"a disc"}])
    loader = MemoryLoader(str(tmp_path / "a.tar"), options(size=32, scale=(1.0, 1.0), hflip=False, normalize=False,
                                                           batch_size=1), TOKENIZER)
    loader.opts.image.ratio = (1.0, 1.0)
    ours = next(iter(loader))["image"][0].permute(1, 2, 0).numpy().astype(float)
    pil = np.asarray(Image.fromarray(img).resize((32, 32), Image.BICUBIC)).astype(float)
    diff = np.abs(ours - pil)
    assert diff.mean() < 1.0, diff.mean()  # in 0..255 levels; measured 0.24 (at most 25, on the disc's edge)
    assert np.abs(ours - pil[:, ::-1]).mean() > 10  # the comparison tells a mirrored image (measured 46)


def test_bad_samples_are_skipped_and_counted_and_an_empty_source_is_an_error(tmp_path):
    good = [make_sample(f"g{i}", i) for i in range(5)]
    broken = {"__key__": "bad", "jpg": b"not a jpeg", "txt": b"x"}
    write_tar(tmp_path / "a.tar", good[:2] + [broken] + good[2:])
    loader = MemoryLoader(str(tmp_path / "a.tar"), options(), TOKENIZER)
    assert loader.num_samples == 5 and loader.skipped == {"image_decode": 1}
    write_tar(tmp_path / "b.tar", [broken])
    with pytest.raises(ValueError, match="data.in_memory: no readable sample in .*b.tar"):
        MemoryLoader(str(tmp_path / "b.tar"), options(), TOKENIZER)


def test_a_stream_position_cannot_resume_an_in_memory_loader(shards):
    loader = MemoryLoader(shards[0], options(), TOKENIZER)
    with pytest.raises(ValueError, match="same data.in_memory setting"):
        loader.load_state_dict({"epoch": 0, "positions": {}, "next": 0, "ended": []})


def test_flips_mirror_about_half_the_crops(shards):
    loader = MemoryLoader(shards[0], options(scale=(1.0, 1.0), batch_size=25, normalize=False), TOKENIZER)
    loader.opts.image.ratio = (1.0, 1.0)
    flipped = next(iter(loader))["image"]
    loader.opts.image.hflip = False
    loader.load_state_dict({"epoch": 0, "next_batch": 0})
    plain = next(iter(loader))["image"]
    mirrored = sum(torch.equal(a, b.flip(-1)) and not torch.equal(a, b) for a, b in zip(flipped, plain))
    same = sum(torch.equal(a, b) for a, b in zip(flipped, plain))
    assert mirrored + same == 25 and 5 <= mirrored <= 20


def test_resampling_or_a_size_schedule_without_in_memory_and_unsized_mixing_are_errors(shards, tmp_path):
    from vlp.config import experiment_from_dict
    from vlp.train.loop import Trainer

    for data, message in (({"train": [{"shards": shards[0]}], "resampled": True, "samples_per_epoch": 10},
                           "data.in_memory reads its sources in epochs: not with data.resampled"),
                          ({"train": [{"shards": shards[0]}, {"shards": shards[0]}]}, "data.samples_per_epoch")):
        exp = experiment_from_dict({"name": "m", "data": {**data, "in_memory": True, "workers": 0},
                                    "model": {"name": "vlp-tiny-32"}, "train": {"max_steps": 1}})
        with pytest.raises(ValueError, match=message):
            Trainer(exp, tmp_path)
    exp = experiment_from_dict({"name": "m", "data": {"train": [{"shards": shards[0]}], "size_schedule": [[0, 32]],
                                                      "workers": 0},
                                "model": {"name": "vlp-tiny-32"}, "train": {"max_steps": 1}})
    with pytest.raises(ValueError, match="data.size_schedule needs data.in_memory: true"):
        Trainer(exp, tmp_path)
    # the augmentations also stream (tests/test_data_stream.py): the config reaches the stream's options
    exp = experiment_from_dict({"name": "m", "data": {"train": [{"shards": shards[0]}], "color_jitter": 0.2,
                                                      "token_drop": 0.1, "cutout": 3, "workers": 0},
                                "model": {"name": "vlp-tiny-32"}, "train": {"max_steps": 1}})
    trainer = Trainer(exp, tmp_path / "stream")
    opts = trainer.loader.stream.opts
    assert (opts.color_jitter, opts.token_drop, opts.cutout) == (0.2, 0.1, 3)


def test_a_size_schedule_crops_early_epochs_smaller_and_must_end_at_the_model_size(shards):
    loader = MemoryLoader(shards[0], options(size=16), TOKENIZER, size_schedule=[[0, 8], [2, 12], [3, 16]])
    sizes = []
    for epoch in range(5):
        loader.set_epoch(epoch)
        sizes.append(next(iter(loader))["image"].shape[-1])
    assert sizes == [8, 8, 12, 16, 16]
    for bad, message in (([[0, 8], [2, 12]], "not the model's 16"), ([[1, 8], [1, 16]], "increasing epochs"),
                         ([[0, "x"]], "pairs")):
        with pytest.raises(ValueError, match=message):
            MemoryLoader(shards[0], options(size=16), TOKENIZER, size_schedule=bad)


def test_token_drop_keeps_start_and_end_and_closes_each_caption_up_in_order():
    from vlp.data.augment import drop_tokens

    captions = ["a dog runs on the grass in the park with a red ball", "two kids", "a man " * 30]
    tokens = TOKENIZER(captions, context_length=24)
    assert tokens[2, -1] == tokens[0].max()  # the long caption was cut: its last token is end-of-text
    dropped = [drop_tokens(tokens, 0.4, torch.Generator().manual_seed(s)) for s in range(200)]
    lost = []
    for new in dropped:
        assert torch.equal(drop_tokens(tokens, 0.0, torch.Generator()), tokens)
        for row, old in zip(new, tokens):
            kept, before = row[row != 0].tolist(), old[old != 0].tolist()
            assert kept[0] == before[0] and kept[-1] == before[-1] and len(kept) >= 2
            it = iter(before)
            assert all(t in it for t in kept)  # an ordered subsequence of the caption
            assert row[len(kept):].eq(0).all()  # closed up: zeros only after the kept tokens
            lost.append((len(before) - len(kept)) / (len(before) - 2))
    assert abs(np.mean(lost) - 0.4) < 0.03
    assert torch.equal(dropped[0], drop_tokens(tokens, 0.4, torch.Generator().manual_seed(0)))


def test_color_jitter_scales_brightness_contrast_and_saturation_within_range_and_keeps_grey_grey():
    from vlp.data.augment import jitter_colors

    images = torch.rand(64, 3, 8, 8) * 50 + 100  # far enough from 0 and 255 that nothing is clipped at 0.2
    out = jitter_colors(images.clone(), 0.2, torch.Generator().manual_seed(1))
    b, c, s = (1 + 0.2 * (2 * torch.rand(3, 64, generator=torch.Generator().manual_seed(1)) - 1))
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)

    def luma(x):
        return (x * weights).sum(1)

    # brightness scales the mean grey; contrast also scales the spread of grey; saturation also scales colour
    assert torch.allclose(luma(out).mean((1, 2)), b * luma(images).mean((1, 2)), rtol=1e-4)
    assert torch.allclose(luma(out).std((1, 2)), b * c * luma(images).std((1, 2)), rtol=1e-4)
    colour = lambda x: x - luma(x).unsqueeze(1)  # noqa: E731
    assert torch.allclose(colour(out), (b * c * s).view(-1, 1, 1, 1) * colour(images), atol=1e-3)
    assert b.min() < 0.9 and b.max() > 1.1 and s.min() < 0.9 and s.max() > 1.1  # the factors do vary
    assert torch.allclose(jitter_colors(images.clone(), 0.0, torch.Generator()), images, atol=1e-3)
    strong = jitter_colors(torch.rand(64, 3, 8, 8) * 255, 0.9, torch.Generator().manual_seed(3))
    assert strong.min() >= 0 and strong.max() <= 255
    grey = images.mean(1, keepdim=True).expand(-1, 3, -1, -1).clone()
    flat = jitter_colors(grey.clone(), 0.3, torch.Generator().manual_seed(2))
    assert (flat.max(1).values - flat.min(1).values).max() < 1e-3  # no colour appears in a grey image


def test_jittered_and_token_dropped_batches_resume_exactly_and_differ_from_plain_ones(shards):
    kw = dict(color_jitter=0.3, token_drop=0.3, cutout=5)
    full = MemoryLoader(shards[0], options(batch_size=5, **kw), TOKENIZER)
    batches = list(full)
    resumed = MemoryLoader(shards[0], options(batch_size=5, **kw), TOKENIZER)
    resumed.load_state_dict({"epoch": 0, "next_batch": 2})
    for a, b in zip(batches[2:], resumed):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["text"], b["text"])
    plain = list(MemoryLoader(shards[0], options(batch_size=5), TOKENIZER))
    assert all(a["uid"] == b["uid"] for a, b in zip(batches, plain))
    assert not torch.equal(batches[0]["image"], plain[0]["image"])
    assert (batches[0]["text"] != 0).sum() < (plain[0]["text"] != 0).sum()
    for bad in ({"color_jitter": 1.0}, {"token_drop": -0.1}, {"cutout": 16}, {"cutout": -1}, {"cutout": 2.5},
                {"cutout": True}):
        with pytest.raises(ValueError, match="data." + next(iter(bad))):
            MemoryLoader(shards[0], options(**bad), TOKENIZER)


def test_cutout_fills_one_square_per_image_with_the_fill_and_clips_it_at_the_edges():
    from vlp.data.augment import cut_out

    images = torch.rand(400, 3, 16, 16) * 100 + 100  # never equal to the fill
    out = cut_out(images.clone(), 6, [10, 20, 30], torch.Generator().manual_seed(0))
    filled = out != images
    assert torch.equal(filled[:, 0], filled[:, 1]) and torch.equal(filled[:, 0], filled[:, 2])
    for c, value in enumerate((10, 20, 30)):
        assert (out[:, c][filled[:, c]] == value).all()
    mask = filled[:, 0]
    area = mask.sum((1, 2))
    assert area.max() == 36 and area.min() >= 9  # a whole square inside; at least its 3x3 quarter at a corner
    centres = []
    for m in mask:  # one axis-aligned rectangle, at most 6 x 6
        ys, xs = m.nonzero(as_tuple=True)
        assert m[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()
        assert ys.max() - ys.min() < 6 and xs.max() - xs.min() < 6
        centres.append((ys.min() + ys.max()) / 2)
    assert min(centres) < 2 and max(centres) > 13  # squares land all over the image
    assert torch.equal(out, cut_out(images.clone(), 6, [10, 20, 30], torch.Generator().manual_seed(0)))


def test_at_epoch_start_and_describe(shards, tmp_path):
    spec, _ = shards
    loader = MemoryLoader(spec, options(batch_size=10), TOKENIZER)  # 25 samples: 3 batches
    assert loader.at_epoch_start()
    batches = iter(loader)
    next(batches)
    assert not loader.at_epoch_start()
    assert len(list(batches)) == 2 and loader.epoch == 1 and loader.at_epoch_start()
    at_end = MemoryLoader(spec, options(batch_size=10), TOKENIZER)
    at_end.load_state_dict({"epoch": 0, "next_batch": 3})  # saved after the epoch's last batch
    assert not at_end.at_epoch_start() and list(at_end) == [] and at_end.epoch == 1 and at_end.at_epoch_start()
    assert loader.describe() == f"shards {spec} (2 shards); skipped so far: none"

    identity = [{"__key__": f"p{i}", "jpg": make_sample("x", i)["jpg"], "json": json.dumps({"identity": i}).encode()}
                for i in range(4)]
    write_tar(tmp_path / "people.tar", identity + [{"__key__": "bad", "jpg": b"not a jpeg", "txt": b"x"}])
    with pytest.raises(ValueError) as error:
        MemoryLoader(str(tmp_path / "people.tar"), options(), TOKENIZER)
    assert str(error.value) == (f"data.in_memory: no readable sample in {tmp_path / 'people.tar'} (1 shard); "
                                "skipped: image_decode 1, no_text 4")
    write_tar(tmp_path / "mixed.tar", identity + [make_sample("g", 9)])
    assert MemoryLoader(str(tmp_path / "mixed.tar"), options(), TOKENIZER).describe() == \
        f"shards {tmp_path / 'mixed.tar'} (1 shard); skipped so far: no_text 4"


def test_both_loaders_build_the_same_batch_from_the_same_samples(tmp_path):
    from vlp.data import Loader, ShardStream

    samples = [make_sample(f"s{i}", i, kind="label" if i % 2 else "caption", label=i, identity=10 + i)
               for i in range(6)]
    write_tar(tmp_path / "a.tar", samples)
    opts = options(batch_size=4, shuffle_buffer=0, normalize=False)  # unshuffled: both keep the shard's order
    stream = next(iter(Loader(ShardStream(str(tmp_path / "a.tar"), opts, TOKENIZER), workers=0)))
    memory = next(iter(MemoryLoader(str(tmp_path / "a.tar"), opts, TOKENIZER)))
    assert stream.keys() == memory.keys() == {"image", "text", "caption", "uid", "key", "kind", "label", "identity",
                                              "source", "meta"}
    for key in ("caption", "uid", "key", "kind", "meta"):
        assert stream[key] == memory[key], key
    assert memory["caption"] == ["caption s0", "caption s1", "caption s2", "caption s3"]
    assert memory["kind"] == ["caption", "label", "caption", "label"]
    for key, expected in (("text", TOKENIZER(memory["caption"])), ("label", torch.tensor([0, 1, 2, 3])),
                          ("identity", torch.tensor([10, 11, 12, 13])), ("source", torch.zeros(4, dtype=torch.long))):
        assert stream[key].dtype == memory[key].dtype == torch.long
        assert torch.equal(stream[key], expected) and torch.equal(memory[key], expected), key
    assert stream["image"].dtype == memory["image"].dtype == torch.uint8
    assert stream["image"].shape == memory["image"].shape == (4, 3, 16, 16)
