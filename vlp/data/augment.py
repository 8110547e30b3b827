"""Batch augmentations shared by the streaming and the in-memory loader, drawn from one seeded generator per batch
(so a resumed run sees exactly the batches of an uninterrupted one):
``data.color_jitter`` (brightness, contrast and saturation of each crop; hue is kept, since captions name colours)
and ``data.token_drop`` (caption tokens dropped at random, the caption closed up: a cheap text augmentation that
also shortens the packed text tower's work).
"""
from __future__ import annotations

import torch


def check_augment(color_jitter: float, token_drop: float) -> None:
    if not 0 <= color_jitter < 1:
        raise ValueError(f"data.color_jitter: {color_jitter} is not in [0, 1)")
    if not 0 <= token_drop < 1:
        raise ValueError(f"data.token_drop: {token_drop} is not in [0, 1)")


def augment_batch(images: torch.Tensor, tokens: torch.Tensor | None, color_jitter: float, token_drop: float,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``images`` (n, 3, h, w) on the uint8 grid [0, 255] (uint8, or floats as the in-memory crops are) and
    ``tokens`` (or None) with the augmentations that are on, drawn from a generator seeded with ``seed``. Jittered
    images are rounded back to the grid and keep their dtype."""
    generator = torch.Generator().manual_seed(seed)
    if color_jitter:
        jittered = jitter_colors(images.float(), color_jitter, generator).round_().clamp_(0, 255)
        images = jittered.to(images.dtype)
    if token_drop and tokens is not None:
        tokens = drop_tokens(tokens, token_drop, generator)
    return images, tokens


def jitter_colors(images: torch.Tensor, amount: float, generator: torch.Generator) -> torch.Tensor:
    """Scale each image's brightness, then contrast (about its mean grey), then saturation (about each pixel's
    grey) by factors drawn uniformly from [1 - amount, 1 + amount]; ``images``: (n, 3, h, w) floats in [0, 255]."""
    n = images.shape[0]
    factors = 1 + amount * (2 * torch.rand(3, n, 1, 1, 1, generator=generator) - 1)
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)  # ITU-R 601 luma, as torchvision's grayscale
    images = (images * factors[0]).clamp_(0, 255)
    mean = (images * weights).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    images = ((images - mean) * factors[1] + mean).clamp_(0, 255)
    grey = (images * weights).sum(1, keepdim=True)
    return ((images - grey) * factors[2] + grey).clamp_(0, 255)


def drop_tokens(tokens: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Drop each token of each row with probability ``p`` and close the row up (zeros after it), keeping the
    first token (start of text) and the last non-zero one (end of text, also where a long caption was cut)."""
    n, length = tokens.shape
    positions = torch.arange(length).expand(n, length)
    last = torch.where(tokens != 0, positions, -1).max(1, keepdim=True).values
    keep = (torch.rand(n, length, generator=generator) >= p) | (positions == 0) | (positions >= last)
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices  # kept tokens first, in order
    closed = tokens.gather(1, order)
    return closed.masked_fill_(positions >= keep.sum(1, keepdim=True), 0)
