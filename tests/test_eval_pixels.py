"""Exact decoding gives open_clip's eval tensors bit for bit, for images of any shape and mode.

The reference is ``open_clip.image_transform(size, is_train=False, mean, std, resize_mode, interpolation="bicubic")``
applied to the image as CLIP_benchmark's loaders hand it over: opened with PIL and converted to RGB, no EXIF
transposition. vlp's side goes through what the evaluators call: :class:`vlp.eval.images.FileImages` (and
:class:`ShardImages`) with ``LoadOptions(fast_decode=False)``.
"""
from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from conftest import REPO, require_shared_data, write_tar
from PIL import Image, ImageOps

sys.path.insert(0, str(REPO / "benchmarks"))
from generated_images import encode, photo  # noqa: E402 - the generator benchmarks/eval_pixels.py shares

from vlp.eval.images import FileImages, LoadOptions, ShardImages
from vlp.eval.models import Preprocess

MODES = ("shortest", "squash")
OPENAI = (open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
OTHER_NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def exif_rotated_jpeg(width: int, height: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the viewer should rotate 90 degrees clockwise
    return encode(Image.fromarray(photo(width, height, 5)), "JPEG", quality=90, exif=exif)


def odd_images() -> dict[str, bytes]:
    """name -> file bytes; the name's suffix is the format."""
    rgba = np.dstack([photo(150, 90, 3), np.tile(np.linspace(0, 255, 150, dtype=np.uint8), (90, 1))])
    grey16 = (photo(90, 61, 4)[..., 0].astype(np.uint16) * 257 + np.arange(61, dtype=np.uint16)[:, None])
    return {
        "tall.jpg": encode(Image.fromarray(photo(120, 300)), "JPEG", quality=90),
        "wide.png": encode(Image.fromarray(photo(300, 101, 1)), "PNG"),
        "tiny_7x40.png": encode(Image.fromarray(photo(7, 40, 2)), "PNG"),
        "tiny_9x31.png": encode(Image.fromarray(photo(9, 31, 15)), "PNG"),
        "tiny_40x7.jpg": encode(Image.fromarray(photo(40, 7, 2)), "JPEG", quality=95),
        "large_1200x500.jpg": encode(Image.fromarray(photo(1200, 500, 6)), "JPEG", quality=90),
        "large_500x1200.jpg": encode(Image.fromarray(photo(500, 1200, 7)), "JPEG", quality=90),
        "odd_641x479.png": encode(Image.fromarray(photo(641, 479, 8)), "PNG"),
        "square_64.jpg": encode(Image.fromarray(photo(64, 64, 9)), "JPEG", quality=90),
        "grey.jpg": encode(Image.fromarray(photo(200, 130, 10)).convert("L"), "JPEG", quality=90),
        "grey.png": encode(Image.fromarray(photo(77, 230, 11)).convert("L"), "PNG"),
        "palette.png": encode(Image.fromarray(photo(180, 97, 12)).convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "palette_transparent.png": encode(Image.fromarray(photo(97, 180, 13)).convert("P"), "PNG", transparency=0),
        "rgba.png": encode(Image.fromarray(rgba, "RGBA"), "PNG"),
        "cmyk.jpg": encode(Image.fromarray(photo(260, 170, 14)).convert("CMYK"), "JPEG", quality=90),
        "grey16.png": encode(Image.fromarray(grey16), "PNG"),
        "exif_rotated.jpg": exif_rotated_jpeg(320, 200),
    }


def open_clip_pixels(data: bytes, size: int, mode: str, mean, std) -> torch.Tensor:
    transform = open_clip.image_transform(size, is_train=False, mean=mean, std=std, resize_mode=mode,
                                          interpolation="bicubic")
    with Image.open(io.BytesIO(data)) as img:
        return transform(img.convert("RGB"))


def vlp_pixels(paths: list[Path], size: int, mode: str, mean, std, fast: bool = False) -> dict[str, torch.Tensor]:
    images = FileImages("odd", [str(p) for p in paths], [{"key": p.name} for p in paths])
    pre = Preprocess(size=size, mean=tuple(mean), std=tuple(std), resize_mode=mode)
    out = {}
    for batch, records in images.batches(pre, LoadOptions(batch_size=7, workers=0, fast_decode=fast)):
        out.update({r["key"]: img for r, img in zip(records, batch)})
    return out


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("odd")
    paths = []
    for name, data in odd_images().items():
        (root / name).write_bytes(data)
        paths.append(root / name)
    return paths


def test_the_generated_set_covers_the_modes_it_claims(odd_files):
    modes = {p.name: Image.open(p).mode for p in odd_files}
    assert {modes["grey.jpg"], modes["grey.png"]} == {"L"}
    assert modes["palette.png"] == modes["palette_transparent.png"] == "P"
    assert modes["rgba.png"] == "RGBA" and modes["cmyk.jpg"] == "CMYK"
    assert modes["grey16.png"] in ("I;16", "I")
    assert Image.open(odd_files[-1]).getexif().get(0x0112) == 6


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size,norm", [(224, OPENAI), (61, OTHER_NORM)])
def test_exact_decoding_is_open_clips_tensor(odd_files, mode, size, norm):
    ours = vlp_pixels(odd_files, size, mode, *norm)
    for path in odd_files:
        theirs = open_clip_pixels(path.read_bytes(), size, mode, *norm)
        assert ours[path.name].shape == theirs.shape == (3, size, size)
        diff = (ours[path.name] - theirs).abs().max().item()
        assert torch.equal(ours[path.name], theirs), f"{path.name}: max abs difference {diff:.3g} ({mode}, {size})"


def test_exif_orientation_is_ignored_as_open_clip_ignores_it(odd_files):
    path = next(p for p in odd_files if p.name == "exif_rotated.jpg")
    ours = vlp_pixels([path], 64, "squash", *OPENAI)[path.name]
    transposed = open_clip.image_transform(64, is_train=False, resize_mode="squash")(
        ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    assert not torch.allclose(ours, transposed, atol=0.5)


def test_shards_give_the_same_tensors_as_files(odd_files, tmp_path):
    samples = [{"__key__": f"s{i:03d}", p.suffix[1:]: p.read_bytes()} for i, p in enumerate(odd_files)]
    write_tar(tmp_path / "00000.tar", samples)
    names = {s["__key__"]: p.name for s, p in zip(samples, odd_files)}
    images = ShardImages("odd", str(tmp_path / "00000.tar"), lambda batch, i: {"key": batch["key"][i]})
    pre = Preprocess(size=96, mean=OPENAI[0], std=OPENAI[1], resize_mode="shortest")
    seen = 0
    for batch, records in images.batches(pre, LoadOptions(batch_size=5, workers=0, fast_decode=False)):
        for record, img in zip(records, batch):
            data = (odd_files[0].parent / names[record["key"]]).read_bytes()
            assert torch.equal(img, open_clip_pixels(data, 96, "shortest", *OPENAI)), names[record["key"]]
            seen += 1
    assert seen == len(odd_files)


@pytest.mark.parametrize("mode", MODES)
def test_fast_decoding_differs_only_where_a_jpeg_is_drafted(odd_files, mode):
    exact = vlp_pixels(odd_files, 96, mode, *OPENAI)
    fast = vlp_pixels(odd_files, 96, mode, *OPENAI, fast=True)
    std = torch.tensor(OPENAI[1]).view(3, 1, 1)
    for path in odd_files:
        with Image.open(path) as img:
            drafted = img.format == "JPEG" and min(img.size) >= 2 * 96  # DCT scaling needs 2x the output
        diff_255 = ((fast[path.name] - exact[path.name]) * std * 255).abs()
        if not drafted:
            assert torch.equal(fast[path.name], exact[path.name]), path.name
        else:  # same geometry: only the decoder's loss, well under a pixel shift's difference
            assert 0 < diff_255.mean() < 3, (path.name, diff_255.mean())


@pytest.mark.parametrize("mode", MODES)
def test_exact_decoding_on_the_real_pedestrian_gallery(mode):
    gallery = require_shared_data("pedestrians", "val", "gallery")
    paths = sorted(gallery.rglob("*.png"))
    assert paths, f"no PNG under {gallery}"
    assert {Image.open(p).size for p in paths[:5]} == {(48, 128)}
    records = [{"key": str(p.relative_to(gallery))} for p in paths]
    images = FileImages("gallery", [str(p) for p in paths], records)
    pre = Preprocess(size=224, mean=OPENAI[0], std=OPENAI[1], resize_mode=mode)
    checked = 0
    for batch, recs in images.batches(pre, LoadOptions(batch_size=64, workers=0, fast_decode=False)):
        for record, img in zip(recs, batch):
            theirs = open_clip_pixels((gallery / record["key"]).read_bytes(), 224, mode, *OPENAI)
            assert torch.equal(img, theirs), f"{record['key']}: max abs difference {(img - theirs).abs().max():.3g}"
            checked += 1
    assert checked == len(paths)
