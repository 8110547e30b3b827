"""How far vlp's default eval decoding (JPEG DCT scaling, ``LoadOptions(fast_decode=True)``) is from the exact
pixels (``--exact-decode``, open_clip's tensors bit for bit) on non-square images.

    .venv/bin/python benchmarks/eval_pixels.py                  # about 5 minutes on 2 busy cores (224 px model)
    .venv/bin/python benchmarks/eval_pixels.py --count 8 --sizes 64    # under a minute

Image sets (all through :class:`vlp.eval.images.FileImages`, the evaluators' path):
- ``pedestrians``: ``../shared/data/pedestrians/val/gallery`` (181 PNGs, 48x128);
- ``synthetic``: ``--count`` generated JPEGs (quality 90), sides 500-1600 px, aspect 1:3 to 3:1, smooth colour
  gradients plus noise (benchmarks/generated_images.py, the generator tests/test_eval_pixels.py uses);
- ``flickr8k``: the first ``--count`` Flickr8k photos (160x160), each stretched bicubic to a random non-square
  500-1600 px size and saved as JPEG (quality 90): real content at sizes where DCT scaling engages.
For each input size and resize mode: the mean and max absolute difference between the two decodings' pixels (0..255
units, after undoing the normalisation), the share of images that differ at all, and the cosine between the image
embeddings of a random ``vlp-tiny-64`` (seed 0, ``force_image_size`` = the input size) on the two (mean, min).
Writes ``benchmarks/out/eval_pixels.json`` and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from generated_images import encode, photo

from vlp.eval.images import FileImages, LoadOptions
from vlp.eval.models import Preprocess

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def random_shape(rng: np.random.Generator) -> tuple[int, int]:
    while True:
        width, height = (int(x) for x in rng.integers(500, 1601, 2))
        if 1 / 3 <= width / height <= 3 and abs(width - height) > 50:
            return width, height


def write_sets(root: Path, count: int) -> dict[str, list[Path]]:
    rng = np.random.default_rng(0)
    sets = {}
    gallery = DATA / "pedestrians" / "val" / "gallery"
    if gallery.exists():
        sets["pedestrians"] = sorted(gallery.rglob("*.png"))
    (root / "synthetic").mkdir()
    sets["synthetic"] = []
    for i in range(count):
        path = root / "synthetic" / f"{i:03d}.jpg"
        path.write_bytes(encode(Image.fromarray(photo(*random_shape(rng), seed=i)), "JPEG", quality=90))
        sets["synthetic"].append(path)
    photos = DATA / "flickr8k" / "images"
    if photos.exists():
        (root / "flickr8k").mkdir()
        sets["flickr8k"] = []
        for i, source in enumerate(sorted(photos.glob("*.jpg"))[:count]):
            path = root / "flickr8k" / source.name
            stretched = Image.open(source).convert("RGB").resize(random_shape(rng), Image.BICUBIC)
            path.write_bytes(encode(stretched, "JPEG", quality=90))
            sets["flickr8k"].append(path)
    return sets


def pixels(paths: list[Path], pre: Preprocess, fast: bool) -> torch.Tensor:
    images = FileImages("bench", [str(p) for p in paths], [{"key": f"{i:06d}"} for i in range(len(paths))])
    out = [batch for batch, _ in images.batches(pre, LoadOptions(batch_size=64, workers=0, fast_decode=fast))]
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=24, help="images in each generated set")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "eval_pixels.json")
    args = parser.parse_args()

    import open_clip

    import vlp.models  # noqa: F401 - registers vlp-tiny-64 with open_clip

    torch.set_grad_enabled(False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sets = write_sets(Path(tmp), args.count)
        for size in args.sizes:
            torch.manual_seed(0)
            model = open_clip.create_model("vlp-tiny-64", force_image_size=size).eval()
            for mode in ("shortest", "squash"):
                pre = Preprocess(size=size, mean=MEAN, std=STD, resize_mode=mode)
                for name, paths in sets.items():
                    exact, fast = pixels(paths, pre, fast=False), pixels(paths, pre, fast=True)
                    diff = ((fast - exact) * torch.tensor(STD).view(1, 3, 1, 1) * 255).abs()
                    cos = torch.nn.functional.cosine_similarity(model.encode_image(exact), model.encode_image(fast))
                    rows.append({"set": name, "images": len(paths), "size": size, "resize_mode": mode,
                                 "mean_abs_255": diff.mean().item(), "max_abs_255": diff.amax().item(),
                                 "images_differing": int((diff.flatten(1).amax(1) > 0).sum()),
                                 "cosine_mean": cos.mean().item(), "cosine_min": cos.min().item()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    print("| set | images | size | resize_mode | mean abs (0..255) | max abs | images differing | cosine mean | "
          "cosine min |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['set']} | {r['images']} | {r['size']} | {r['resize_mode']} | {r['mean_abs_255']:.3f} | "
              f"{r['max_abs_255']:.0f} | {r['images_differing']} | {r['cosine_mean']:.6f} | {r['cosine_min']:.6f} |")


if __name__ == "__main__":
    main()
