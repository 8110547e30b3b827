"""Decoding and preprocessing of raw samples, equivalent to open_clip's transforms but cheaper.

open_clip decodes the full JPEG, crops and resizes with torchvision, converts each image to a float tensor
and normalises it sample by sample. Here:
- JPEGs are decoded with DCT scaling (PIL ``draft``) when the output is much smaller than the stored image:
  the decoder produces 1/2, 1/4 or 1/8 of the pixels directly, never fewer than the crop needs;
- a training crop and its resize are one PIL call (``resize(box=...)``), same geometry as torchvision's
  ``resized_crop``; the eval transform is open_clip's two steps (resize the whole image, then crop);
- images stay uint8 until the batch is stacked, then are normalised once per batch;
- captions are tokenised once per batch.
Crop parameters come from a seeded ``random.Random`` (not torch's global RNG) so a stream is reproducible.
The pixel difference to open_clip's own transform is measured in ``benchmarks/loader_throughput.py``.
"""
from __future__ import annotations

import functools
import io
import json
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
# open_clip.constants' OPENAI_DATASET_MEAN/STD, restated: importing open_clip costs seconds in every worker and CLI
# call that never builds a model (tests/test_data_preprocess.py checks they agree).
OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)


class BadSample(Exception):
    """A sample that cannot be used; ``reason`` is the counter it is reported under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


RESIZE_MODES = ("shortest", "squash")  # open_clip's preprocess_cfg names; its "longest" (padding) is not here


@dataclass
class ImageOptions:
    size: int = 224
    train: bool = True  # RandomResizedCrop (open_clip's training transform) vs the eval transform (resize_mode)
    scale: tuple[float, float] = (0.9, 1.0)  # open_clip's AugmentationCfg default
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    draft: bool = True
    hflip: bool = False  # mirror half the training images (captions rarely say left or right)
    mean: tuple[float, ...] = OPENAI_DATASET_MEAN
    std: tuple[float, ...] = OPENAI_DATASET_STD
    # eval transform, as open_clip's preprocess_cfg names it: "shortest" (resize the shorter side, center crop)
    # or "squash" (the whole image resized to a square)
    resize_mode: str = "shortest"

    def __post_init__(self):
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode: {self.resize_mode!r} is not one of {', '.join(RESIZE_MODES)}")


def random_resized_crop_box(width: int, height: int, scale, ratio, rng: random.Random):
    """torchvision's RandomResizedCrop.get_params, drawing from ``rng``; returns (left, top, right, bottom)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return left, top, left + w, top + h
    in_ratio = width / height  # fallback: central crop with the ratio clamped, as torchvision does
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def shortest_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) once the shorter side is ``size``: torchvision's ``Resize(size)``, the long side rounded down."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """The ``size`` square in the middle of a (width, height) image, with torchvision ``CenterCrop``'s rounding of the
    offsets; (left, top, right, bottom)."""
    left, top = round((width - size) / 2.0), round((height - size) / 2.0)
    return left, top, left + size, top + size


def decode_rgb(data: bytes, need: int | None) -> tuple[Image.Image, tuple[int, int]]:
    """(RGB image, stored (width, height)); with ``need``, JPEGs are decoded with DCT scaling (PIL ``draft``) to the
    smallest scale whose sides stay >= ``need``. Undecodable bytes raise :class:`BadSample` ("image_decode").

    Conversion to RGB comes first, as in the loaders that feed open_clip's eval transform (torchvision's ImageFolder
    loader and webdataset's "pil" decoder, both of CLIP_benchmark; open_clip's own "pilrgb"): palette, grey, RGBA
    (alpha dropped), CMYK and 16-bit images are resampled as RGB (open_clip's transform converts only after its crop,
    which matters only for an image handed to it unconverted). No EXIF orientation is applied: neither those loaders
    nor open_clip's transform apply it, so an EXIF-rotated JPEG is seen as stored."""
    try:
        img = Image.open(io.BytesIO(data))
        stored = img.size
        if need is not None and img.format == "JPEG":
            img.draft("RGB", (need, need))
        return img.convert("RGB"), stored
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken images
        raise BadSample("image_decode", f"{type(e).__name__}: {e}") from e


class ImageDecoder:
    """bytes -> uint8 tensor (3, size, size).

    The eval transform is open_clip's ``image_transform(size, is_train=False, resize_mode=...)`` step for step:
    "shortest" resizes the whole image (bicubic) so that its shorter side is ``size``, then crops the centre square;
    "squash" resizes it to (size, size). Without drafting the pixels are open_clip's, bit for bit
    (tests/test_eval_pixels.py). A drafted JPEG goes through the same two steps from its smaller pixel grid, so that
    its pixels differ from open_clip's only by what the DCT-scaled decode loses.
    """

    def __init__(self, opts: ImageOptions):
        self.opts = opts
        # The smallest crop side relative to the shorter image side; drafting keeps that many pixels >= size.
        self.min_crop = math.sqrt(opts.scale[0] * min(opts.ratio)) if opts.train else 1.0

    def __call__(self, data: bytes, rng: random.Random) -> torch.Tensor:
        size = self.opts.size
        # geometry comes from the stored size, whatever the decoder scale
        img, (width, height) = decode_rgb(data, math.ceil(size / self.min_crop) if self.opts.draft else None)
        if not self.opts.train:
            return _to_tensor(self._eval_resize(img, width, height))
        box = random_resized_crop_box(width, height, self.opts.scale, self.opts.ratio, rng)
        if img.size != (width, height):  # drafted: the same box, on the smaller pixel grid
            sx, sy = img.width / width, img.height / height
            box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
        img = img.resize((size, size), Image.BICUBIC, box=box)
        if self.opts.hflip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return _to_tensor(img)

    def _eval_resize(self, img: Image.Image, width: int, height: int) -> Image.Image:
        size = self.opts.size
        if self.opts.resize_mode == "squash":
            return img.resize((size, size), Image.BICUBIC)
        # Two steps, not one resize of the centre square: the long side is rounded down to whole pixels before the
        # crop, so its scale differs slightly from the short side's, and the crop starts on a whole resized pixel.
        resized = shortest_side_size(width, height, size)
        return img.resize(resized, Image.BICUBIC).crop(center_crop_box(*resized, size))


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


class Normalize:
    """uint8 (N, 3, H, W) -> float32, scaled to [0, 1] and normalised, as ToTensor + Normalize would. The constants
    live on ``device``, so a trainer normalises batches on its accelerator without a host copy per batch."""

    def __init__(self, mean, std, device: torch.device | str | None = None):
        self.shift = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0
        self.scale = 1.0 / (torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.shift) * self.scale


def normalize_batch(images: torch.Tensor, mean, std) -> torch.Tensor:
    """:class:`Normalize` on the CPU, for one batch (the constants are built once per mean and std)."""
    return _cpu_normalize(tuple(mean), tuple(std))(images)


@functools.lru_cache(maxsize=16)
def _cpu_normalize(mean: tuple, std: tuple) -> Normalize:
    return Normalize(mean, std)


def pick_captions(available: int, caption: str, count: int, rng: random.Random) -> list[int]:
    """Which of a sample's ``available`` captions it contributes, as ``count`` indices: its first with caption
    "first"; with "random", drawn from ``rng``, distinct while the sample has enough, then drawn again with
    replacement, so every sample gives exactly ``count``. Both loaders draw through here (the stream from a generator
    per sample, data.in_memory from one per batch); a sample with a single caption (a txt, no json["captions"])
    draws too, so that the two consume their generators by the same rule."""
    if caption != "random":
        return [0] * count
    chosen = rng.sample(range(available), min(count, available))
    return chosen + rng.choices(range(available), k=count - len(chosen))


@dataclass(frozen=True)
class LabelPrompts:
    """Class names and prompt templates (``{c}`` where the name goes) that turn a labelled sample into text: the
    label data of Saito et al. 2023 ("Prefix Conditioning Unifies Language and Label Supervision")."""
    name: str  # where they come from (a prompt registry entry), for messages
    classnames: tuple[str, ...]
    templates: tuple[str, ...]

    def texts(self, label: int) -> list[str]:
        return [t.replace("{c}", self.classnames[label]) for t in self.templates]


def parse_sample(raw: dict, require_text: bool, caption: str, rng: random.Random | None = None,
                 count: int = 1, prompts: LabelPrompts | None = None) -> dict:
    """Pick the image bytes, captions and metadata out of a raw sample, or raise :class:`BadSample`.

    ``captions`` holds the texts a caption draw chooses from: the non-empty entries of json["captions"] with
    ``caption="random"``, else the txt (``[""]`` for a sample without text, when text is not required). With ``rng``,
    ``texts`` holds the ``count`` that :func:`pick_captions` draws; ``text`` is the first of them (without ``rng``,
    the first of ``captions``). With ``prompts`` the sample is label data: its captions are its class's prompts
    (one drawn per step, whatever ``caption`` says), its kind ``label``, and a sample without a usable label is bad.
    """
    image = next((raw[k] for k in IMAGE_KEYS if k in raw), None)
    if image is None:
        raise BadSample("no_image", raw["__key__"])
    meta = {}
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadSample("bad_json", f"{raw['__key__']}: {e}") from e
    label = meta.get("label")
    if label is None and "cls" in raw:
        try:
            label = int(raw["cls"])
        except ValueError as e:
            raise BadSample("bad_cls", raw["__key__"]) from e
    if prompts is not None:
        return _label_sample(raw, image, meta, label, prompts, rng, count)
    captions = [c for c in meta.get("captions") or [] if c] if caption == "random" else []
    if not captions and "txt" in raw:
        try:
            captions = [raw["txt"].decode("utf-8").strip()]
        except UnicodeDecodeError as e:
            raise BadSample("text_not_utf8", raw["__key__"]) from e
    has_text = bool(captions)  # a txt member, even an empty one, makes a caption sample
    if require_text and not any(captions):
        raise BadSample("no_text", raw["__key__"])
    captions = captions or [""]
    texts = None
    if rng is not None:
        texts = [captions[i] for i in pick_captions(len(captions), caption, count, rng)]
    return {
        "image": image,
        "captions": captions,
        "text": texts[0] if texts else captions[0],
        "texts": texts,
        "key": raw["__key__"],
        "uid": meta.get("uid", ""),
        "label": -1 if label is None else int(label),
        "identity": int(meta.get("identity", -1)),
        "kind": meta.get("kind", "label" if label is not None and not has_text else "caption"),
        "meta": meta,
    }


def _label_sample(raw: dict, image: bytes, meta: dict, label, prompts: LabelPrompts, rng, count: int) -> dict:
    if label is None:
        raise BadSample("no_label", raw["__key__"])
    if not 0 <= int(label) < len(prompts.classnames):
        raise BadSample("label_out_of_range", f"{raw['__key__']}: {label} for the {len(prompts.classnames)} classes "
                                              f"of {prompts.name}")
    captions = prompts.texts(int(label))
    texts = [captions[i] for i in pick_captions(len(captions), "random", count, rng)] if rng is not None else None
    return {"image": image, "captions": captions, "text": texts[0] if texts else captions[0], "texts": texts,
            "key": raw["__key__"], "uid": meta.get("uid", ""), "label": int(label),
            "identity": int(meta.get("identity", -1)), "kind": "label", "meta": meta}
