"""Clothing-colour attributes read off a pedestrian crop, and pseudo-captions made from them.

Person-centric pretraining sets without human text (PLIP's SYNTH-PEDES, Zuo et al. 2023) caption each image from
attributes. This module does the smallest reliable version of that for upright, full-body crops (re-ID style, e.g.
48x128): the colour of the upper-body and of the lower-body clothing, named from a small fixed vocabulary, and a few
caption templates filled with them. The captions are pseudo-captions: right only as often as the colour reader is
(measured by eye on 50 crops, docs/attributes.md).

How a slot's colour is read:
1. a fixed box of the crop (:data:`REGIONS`, fractions of height and width: the crop is assumed to hold one upright
   person from head to feet, as re-ID detectors cut them);
2. pixels that look like the background are dropped: those close in colour to some pixel of the crop's outer
   columns on the same rows (the person rarely reaches the outer eighth of the width at those heights), unless that
   would drop most of the box (a wide coat reaching the edges must not erase itself);
3. every remaining pixel gets a colour name (:func:`pixel_color_names`, HSV rules), and the slot takes the most
   frequent name, a majority vote: robust to shadows, a bag strap, a bit of skin or background.
"""
from __future__ import annotations

import argparse
import hashlib
import random
from pathlib import Path

import numpy as np
from PIL import Image

# The fixed vocabulary: a config that names colours (prompts, probes) can rely on exactly these words.
COLORS = ("black", "white", "grey", "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown")
SLOTS = ("upper_color", "lower_color")

# slot -> (top, bottom, left, right) as fractions of the crop's height and width. Head and neck take about the top
# fifth of a re-ID crop; the torso (jacket, shirt, coat) lies below it to about half the height; from 60% down to
# 85% are the thighs and shins (trousers, skirt, tights), below that the feet, too few pixels to name a shoe colour.
# The central columns keep the arms' swing and the background beside the body out of most boxes.
REGIONS = {
    "upper_color": (0.22, 0.48, 0.25, 0.75),
    "lower_color": (0.60, 0.85, 0.30, 0.70),
}
BACKGROUND_COLUMNS = 0.125  # the outer fraction of the width on each side whose pixels stand for the background
BACKGROUND_DISTANCE = 0.07  # RGB distance (0-1 scale) under which a pixel counts as background-like
MIN_KEPT = 0.3  # background removal is skipped when it would leave less than this share of a box

TEMPLATES = (
    "A person wearing {upper_a} top and {lower} bottoms.",
    "A pedestrian in {upper_a} upper garment and {lower_a} lower garment.",
    "A photo of a person dressed in {upper} on the upper body and {lower} on the lower body.",
    "Someone walking in {upper_a} top with {lower} clothes below.",
    "A person whose upper clothing is {upper} and whose lower clothing is {lower}.",
)


def pixel_color_names(rgb: np.ndarray) -> np.ndarray:
    """Index into :data:`COLORS` of each pixel of ``rgb`` (``(..., 3)``, floats in [0, 1]).

    HSV rules rather than nearest reference colours: what matters on a surveillance crop is first whether a pixel
    has colour at all (low value: black; low saturation: white, grey or black by value), and only then its hue.
    Brown is a dark or greyish orange, pink a light or pale red or a magenta, as people name them.
    """
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(-1)
    chroma = v - rgb.min(-1)
    s = np.where(v > 0, chroma / np.maximum(v, 1e-6), 0.0)
    safe = np.maximum(chroma, 1e-6)
    h = np.where(v == r, ((g - b) / safe) % 6, np.where(v == g, (b - r) / safe + 2, (r - g) / safe + 4)) * 60.0
    idx = {name: i for i, name in enumerate(COLORS)}
    hue_name = np.select(
        [(h < 15) | (h >= 340), h < 45, h < 70, h < 170, h < 280, h < 310],
        [idx["red"], idx["orange"], idx["yellow"], idx["green"], idx["blue"], idx["purple"]],
        idx["pink"],
    )
    # Dark or washed-out warm hues are what people call brown (camel coats, khaki, leather), not orange or yellow.
    warm = (hue_name == idx["orange"]) | (hue_name == idx["yellow"])
    hue_name = np.where(warm & ((v < 0.55) | (s < 0.45)), idx["brown"], hue_name)
    hue_name = np.where((hue_name == idx["red"]) & (v > 0.7) & (s < 0.5), idx["pink"], hue_name)
    hue_name = np.where((hue_name == idx["pink"]) & (v < 0.45), idx["purple"], hue_name)
    # Surveillance cameras tint greys blue-violet (the pedestrian set's second camera turns grey pavement lavender),
    # so a pale blue or violet counts as grey up to a higher saturation than other hues; for the same reason blue
    # reaches to 280 degrees, leaving purple the narrow band people mean by it.
    achromatic = (s < 0.2) | ((h >= 200) & (h < 310) & (s < 0.28))
    out = np.where(achromatic, np.where(v > 0.75, idx["white"], np.where(v < 0.3, idx["black"], idx["grey"])),
                   hue_name)
    return np.where(v < 0.2, idx["black"], out)  # too dark for a hue to mean anything


def _as_rgb(image) -> np.ndarray:
    if isinstance(image, (str, Path)):
        with Image.open(image) as img:
            image = img.convert("RGB")
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {array.shape}")
    return array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(np.float32)


def _box(rgb: np.ndarray, fractions: tuple[float, float, float, float]) -> tuple[slice, slice]:
    height, width = rgb.shape[:2]
    top, bottom, left, right = fractions
    rows = slice(int(round(top * height)), max(int(round(bottom * height)), int(round(top * height)) + 1))
    cols = slice(int(round(left * width)), max(int(round(right * width)), int(round(left * width)) + 1))
    return rows, cols


def clothing_pixels(rgb: np.ndarray, slot: str) -> np.ndarray:
    """The pixels (``(n, 3)``) of a slot's box that do not look like background (see the module docstring)."""
    rows, cols = _box(rgb, REGIONS[slot])
    pixels = rgb[rows, cols].reshape(-1, 3)
    edge = max(1, int(round(BACKGROUND_COLUMNS * rgb.shape[1])))
    background = np.concatenate([rgb[rows, :edge], rgb[rows, -edge:]], axis=1).reshape(-1, 3)
    # Squared distances to every background pixel as |a|^2 + |b|^2 - 2ab, the product by einsum's own loop: a
    # threaded BLAS matmul of this small size spins on a busy machine (5x slower on 2 loaded cores), and this runs
    # once per image in the process that lists the inputs.
    product = np.einsum("ic,jc->ij", pixels, background)
    squared = (pixels ** 2).sum(1)[:, None] + (background ** 2).sum(1)[None, :] - 2.0 * product
    keep = squared.min(1) >= BACKGROUND_DISTANCE ** 2
    return pixels[keep] if keep.mean() >= MIN_KEPT else pixels


def read_attributes(image) -> dict[str, str]:
    """``{"upper_color": name, "lower_color": name}`` of a pedestrian crop (path, PIL image or RGB array)."""
    rgb = _as_rgb(image)
    attributes = {}
    for slot in SLOTS:
        votes = np.bincount(pixel_color_names(clothing_pixels(rgb, slot)), minlength=len(COLORS))
        attributes[slot] = COLORS[int(votes.argmax())]
    return attributes


def _with_article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def attribute_captions(attributes: dict[str, str], key: str) -> list[str]:
    """Every template filled with ``attributes``, rotated so that the first (the sample's ``txt``) is the template
    that ``key`` picks: a stable choice (md5, not Python's salted hash) that varies across images, so even a stream
    reading only ``txt`` sees every template; ``json["captions"]`` keeps all for ``data.caption: random``."""
    upper, lower = attributes["upper_color"], attributes["lower_color"]
    texts = [t.format(upper=upper, lower=lower, upper_a=_with_article(upper), lower_a=_with_article(lower))
             for t in TEMPLATES]
    start = int(hashlib.md5(key.encode("utf-8")).hexdigest(), 16) % len(texts)
    return texts[start:] + texts[:start]


def caption_image(path: str | Path, key: str) -> tuple[list[str], dict[str, str]]:
    """(captions, attributes) of one image file: what ``vlp shards identities --captions attributes`` stores."""
    attributes = read_attributes(path)
    return attribute_captions(attributes, key), attributes


def sample_crops(root: str | Path, count: int = 50, seed: int = 0) -> list[Path]:
    """``count`` crops of ``<root>/<person>/<camera>_<angle>.*`` for a check by eye: distinct people while there are
    enough, cameras taken in turn, the angle drawn; seeded, so the same crops come back every time."""
    rng = random.Random(seed)
    people = sorted(p for p in Path(root).iterdir() if p.is_dir())
    order = rng.sample(people, len(people))
    chosen = []
    for i in range(count):
        files = sorted(f for f in order[i % len(order)].iterdir() if f.is_file())
        cameras = sorted({f.name.split("_")[0] for f in files})
        camera = cameras[i % len(cameras)]
        candidates = [f for f in files if f.name.split("_")[0] == camera and f not in chosen]
        chosen.append(rng.choice(candidates or files))
    return chosen


def contact_sheet(paths: list[Path], out: str | Path, columns: int = 10, scale: int = 2) -> list[dict[str, str]]:
    """A PNG grid of the crops, enlarged ``scale`` times, each with its number and predicted slot names under it
    (``U`` upper, ``L`` lower); returns the predictions in the same order."""
    from PIL import ImageDraw, ImageFont

    crops = [Image.open(p).convert("RGB") for p in paths]
    width = max(c.width for c in crops) * scale
    height = max(c.height for c in crops) * scale
    label = 36
    rows = (len(crops) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (width + 4), rows * (height + label + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    try:
        font = ImageFont.truetype("DejaVuSans.ttf", 11)
    except OSError:
        font = ImageFont.load_default()
    predictions = []
    for i, (path, crop) in enumerate(zip(paths, crops)):
        attributes = read_attributes(crop)
        predictions.append(attributes)
        x, y = (i % columns) * (width + 4), (i // columns) * (height + label + 4)
        sheet.paste(crop.resize((crop.width * scale, crop.height * scale), Image.NEAREST), (x, y))
        draw.text((x + 1, y + height + 1), f"{i} U:{attributes['upper_color']}", fill="black", font=font)
        draw.text((x + 1, y + height + 17), f"   L:{attributes['lower_color']}", fill="black", font=font)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return predictions


def main(argv: list[str] | None = None) -> int:
    """``python -m vlp.data.attributes ROOT --out sheet.png``: the contact sheet of docs/attributes.md."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("root", help="identity folders <root>/<person>/<camera>_<angle>.png")
    parser.add_argument("--out", default="benchmarks/out/attributes/sheet.png")
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = sample_crops(args.root, args.count, args.seed)
    predictions = contact_sheet(paths, args.out)
    for i, (path, attributes) in enumerate(zip(paths, predictions)):
        print(i, f"{path.parent.name}/{path.name}", attributes["upper_color"], attributes["lower_color"], sep="\t")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
