"""vlp's training crop against open_clip's training transform (``image_transform(size, is_train=True)``:
torchvision's RandomResizedCrop with the config's scale, the default aspect ratio range, bicubic), as docs/eval.md
("Training transforms vs open_clip") states it: the same distribution of crop boxes, the same fallback box, the
same pixels for the same box but at the box's edges, and a drafted JPEG decode only where the image is large."""
from __future__ import annotations

import io
import math
import random
import sys

import numpy as np
import open_clip
import pytest
import torch
from conftest import REPO
from PIL import Image
from scipy.stats import ks_2samp
from torchvision.transforms import RandomResizedCrop

from vlp.data import ImageDecoder, ImageOptions
from vlp.data.preprocess import random_resized_crop_box

sys.path.insert(0, str(REPO / "benchmarks"))
from generated_images import encode, photo  # noqa: E402

DRAWS = 3000


def torchvision_boxes(width: int, height: int, scale, seed: int) -> np.ndarray:
    torch.manual_seed(seed)
    img = Image.new("RGB", (width, height))
    boxes = [RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3]) for _ in range(DRAWS)]
    return np.array([(left, top, left + w, top + h) for top, left, h, w in boxes])


def vlp_boxes(width: int, height: int, scale, seed: int) -> np.ndarray:
    rng = random.Random(seed)
    return np.array([random_resized_crop_box(width, height, scale, (3 / 4, 4 / 3), rng) for _ in range(DRAWS)])


@pytest.mark.parametrize("width,height,scale", [(640, 480, (0.9, 1.0)), (300, 101, (0.08, 1.0)),
                                                (160, 160, (0.08, 1.0)), (97, 131, (0.5, 1.0))])
def test_crop_boxes_follow_torchvisions_distribution(width, height, scale):
    ours, theirs = vlp_boxes(width, height, scale, 0), torchvision_boxes(width, height, scale, 0)
    for name, column in (("area", lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])),
                         ("log aspect", lambda b: np.log((b[:, 2] - b[:, 0]) / (b[:, 3] - b[:, 1]))),
                         ("left", lambda b: b[:, 0]), ("top", lambda b: b[:, 1])):
        p = ks_2samp(column(ours), column(theirs)).pvalue
        assert p > 1e-3, (name, p)


def test_the_pedestrian_shape_always_gets_the_central_fallback_crop():
    """48x128 (aspect 0.375): no box of 90-100% of the area has an aspect in [3/4, 4/3], so both always crop the
    central 48x64 (the aspect clamped to 3/4) and resize it: a person's head and feet are never seen."""
    expected = (0, 32, 48, 96)
    assert {tuple(b) for b in vlp_boxes(48, 128, (0.9, 1.0), 0)} == {expected}
    assert {tuple(b) for b in torchvision_boxes(48, 128, (0.9, 1.0), 0)} == {expected}


def open_clip_crop(img: Image.Image, box, size: int, scale, monkeypatch) -> torch.Tensor:
    left, top, right, bottom = box
    monkeypatch.setattr(RandomResizedCrop, "get_params",
                        staticmethod(lambda image, s, r: (top, left, bottom - top, right - left)))
    transform = open_clip.image_transform(size, is_train=True, mean=(0.0,) * 3, std=(1.0,) * 3,
                                          aug_cfg={"scale": scale})
    return (transform(img) * 255).round().to(torch.uint8)


@pytest.mark.parametrize("width,height,size", [(640, 480, 224), (300, 250, 96), (48, 128, 64), (900, 700, 64)])
def test_the_same_box_gives_open_clips_pixels_but_at_its_edges(width, height, size, monkeypatch):
    data = encode(Image.fromarray(photo(width, height, 3)), "PNG")
    scale = (0.9, 1.0)
    for seed in range(4):
        box = random_resized_crop_box(width, height, scale, (3 / 4, 4 / 3), random.Random(seed))
        ours = ImageDecoder(ImageOptions(size=size, train=True, scale=scale, draft=False))(data, random.Random(seed))
        theirs = open_clip_crop(Image.open(io.BytesIO(data)).convert("RGB"), box, size, scale,
                                monkeypatch)
        diff = (ours.int() - theirs.int()).abs().amax(0)
        # PIL resamples the box from the whole image (pixels just outside it enter the filter at its edges);
        # torchvision crops first: only the two outermost output rows and columns may differ
        assert diff[2:-2, 2:-2].max() == 0, (box, diff[2:-2, 2:-2].max())
        assert diff.max() <= 8 and diff.float().mean() < 0.1, (box, diff.max(), diff.float().mean())
        inside = [box[0] > 0, box[1] > 0, box[2] < width, box[3] < height]  # left, top, right, bottom
        strips = (diff[2:-2, :2], diff[:2, 2:-2], diff[2:-2, -2:], diff[-2:, 2:-2])  # corners belong to two sides
        for edge, strip in zip(inside, strips):
            if not edge:  # where the box touches the image's edge both clamp alike
                assert strip.max() == 0, box


def test_drafted_decoding_only_for_large_jpegs():
    """A JPEG is decoded at a DCT scale only when its shorter side is at least twice the smallest crop side the
    scale range allows, size / sqrt(scale_min * 3/4); the crop box is the same, the pixels differ by the decode."""
    size, scale = 64, (0.9, 1.0)
    need = math.ceil(size / math.sqrt(scale[0] * 3 / 4))
    assert need == 78
    for width, height, drafted in ((155, 300, False), (156, 300, True), (700, 500, True)):
        data = encode(Image.fromarray(photo(width, height, 4)), "JPEG", quality=90)
        fast, exact = (ImageDecoder(ImageOptions(size=size, train=True, scale=scale, draft=draft))(
            data, random.Random(1)) for draft in (True, False))
        diff = (fast.int() - exact.int()).abs().float()
        assert (diff.max() > 0) == drafted, (width, height)
        assert diff.mean() < 3
