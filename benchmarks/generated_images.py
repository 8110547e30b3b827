"""Generated test images for the pixel-exactness tests (tests/test_eval_pixels.py and others) and for
benchmarks/eval_pixels.py: smooth colour gradients plus noise, at any size, in any format PIL writes.

Importable from both: the benchmarks put their own folder on ``sys.path`` by running from it, the tests add it.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients plus texture (uint8 RGB, height x width): resampling errors would show."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rng = np.random.default_rng(seed)
    img = np.stack([128 + 100 * np.sin(5 * x + c) * np.cos(4 * y - c) for c in range(3)], -1)
    return np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kw)
    return out.getvalue()
