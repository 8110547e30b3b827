"""The fast image path against open_clip's own transforms, on the same pixels."""
from __future__ import annotations

import io
import random

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from vlp.data.preprocess import BadSample, ImageDecoder, ImageOptions, normalize_batch, parse_sample, pick_captions


def smooth_jpeg(size: int = 160, width: int | None = None) -> bytes:
    """A photo-like image: smooth gradients plus a little texture, so resampling differences stay small."""
    width = width or size
    y, x = np.mgrid[0:size, 0:width] / size
    rng = np.random.default_rng(0)
    channels = [128 + 100 * np.sin(3 * x + c) * np.cos(2 * y - c) for c in range(3)]
    img = np.stack(channels, -1) + rng.normal(0, 4, (size, width, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


@pytest.mark.parametrize("size,mode", [(32, "shortest"), (64, "shortest"), (32, "squash"), (64, "squash")])
def test_eval_path_matches_open_clip_eval_transform(size, mode):
    data = smooth_jpeg(160, width=240)  # not square: the two resize modes keep different pixels
    ours = ImageDecoder(ImageOptions(size=size, train=False, draft=False, resize_mode=mode))(data, random.Random(0))
    ours = normalize_batch(ours[None], open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)[0]
    transform = open_clip.image_transform(size, is_train=False, resize_mode=mode)
    theirs = transform(Image.open(io.BytesIO(data)))
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)
    diff_255 = ((ours - theirs) * std * 255).abs()
    assert ours.shape == theirs.shape == (3, size, size)
    assert diff_255.mean() < 0.01, f"mean abs difference {diff_255.mean():.2f} (0..255 units)"
    other = "squash" if mode == "shortest" else "shortest"
    assert ((transform(Image.open(io.BytesIO(data))) - open_clip.image_transform(size, is_train=False,
            resize_mode=other)(Image.open(io.BytesIO(data)))) * std * 255).abs().mean() > 1  # the modes differ here


def test_an_unknown_resize_mode_is_an_error():
    with pytest.raises(ValueError, match="resize_mode: 'longest'"):
        ImageOptions(resize_mode="longest")


@pytest.mark.parametrize("size", [32, 64])
def test_draft_decoding_keeps_the_crop_and_stays_close(size):
    data = smooth_jpeg()
    full = ImageDecoder(ImageOptions(size=size, train=True, draft=False))(data, random.Random(7)).float()
    draft = ImageDecoder(ImageOptions(size=size, train=True, draft=True))(data, random.Random(7)).float()
    assert (full - draft).abs().mean() < 1.5  # same crop box drawn on the stored size, decoded at 1/2-1/4 scale
    other = ImageDecoder(ImageOptions(size=size, train=True, draft=False))(data, random.Random(8)).float()
    assert (full - other).abs().mean() > (full - draft).abs().mean()


def test_default_normalisation_is_open_clips():
    from vlp.data import preprocess

    assert preprocess.OPENAI_DATASET_MEAN == open_clip.OPENAI_DATASET_MEAN
    assert preprocess.OPENAI_DATASET_STD == open_clip.OPENAI_DATASET_STD


def test_hflip_mirrors_about_half_the_crops_and_nothing_else():
    data = smooth_jpeg()
    plain = ImageDecoder(ImageOptions(size=32, train=True))
    flip = ImageDecoder(ImageOptions(size=32, train=True, hflip=True))
    mirrored = 0
    for seed in range(40):
        a, b = plain(data, random.Random(seed)), flip(data, random.Random(seed))  # the same crop box is drawn
        if not torch.equal(a, b):
            assert torch.equal(a.flip(-1), b), f"seed {seed}: the image differs by more than a mirror"
            mirrored += 1
    assert 10 <= mirrored <= 30, mirrored
    evaluation = ImageOptions(size=32, train=False, hflip=True)  # never at evaluation
    assert torch.equal(ImageDecoder(evaluation)(data, random.Random(1)),
                       ImageDecoder(ImageOptions(size=32, train=False))(data, random.Random(1)))


def test_caption_draws_are_distinct_first_then_repeat_and_one_draw_is_a_plain_choice():
    assert pick_captions(5, "first", 1, random.Random(0)) == [0]
    rng = random.Random(0)
    state = rng.getstate()
    pick_captions(5, "first", 1, rng)
    assert rng.getstate() == state  # "first" leaves the generator (and so the crop drawn next) as it was
    for seed in range(50):
        rng, reference = random.Random(seed), random.Random(seed)
        assert pick_captions(7, "random", 1, rng) == [reference.choice(range(7))]
        assert rng.random() == reference.random()  # one caption costs what random.choice costs
        three = pick_captions(5, "random", 3, random.Random(seed))
        assert len(set(three)) == 3 and all(0 <= i < 5 for i in three)
        short = pick_captions(2, "random", 5, random.Random(seed))
        assert sorted(set(short[:2])) == [0, 1] and set(short[2:]) <= {0, 1} and len(short) == 5
        assert pick_captions(1, "random", 3, random.Random(seed)) == [0, 0, 0]
    counts = np.bincount([pick_captions(4, "random", 1, random.Random(s))[0] for s in range(4000)], minlength=4)
    assert counts.min() > 900 and counts.max() < 1100  # uniform: 1000 each


def test_parse_sample_offers_the_json_captions_or_the_txt():
    listed = {"__key__": "a", "jpg": b"x", "txt": b" first ", "json": b'{"captions": ["p", "", "q"], "uid": "u"}'}
    assert parse_sample(listed, True, "random")["captions"] == ["p", "q"]  # an empty caption is none
    assert parse_sample(listed, True, "first")["captions"] == ["first"]
    drawn = parse_sample(listed, True, "random", random.Random(3), count=3)
    assert sorted(drawn["texts"][:2]) == ["p", "q"] and drawn["text"] == drawn["texts"][0]
    assert parse_sample({**listed, "json": b'{"captions": [""]}'}, True, "random")["captions"] == ["first"]
    labelled = {"__key__": "b", "jpg": b"x", "cls": b"4"}
    assert parse_sample(labelled, False, "random")["captions"] == [""]
    assert parse_sample(labelled, False, "random")["kind"] == "label"
    with pytest.raises(BadSample, match="no_text"):
        parse_sample(labelled, True, "first")
