"""Batch augmentations shared by the streaming and the in-memory loader, drawn from one seeded generator per batch
(so a resumed run sees exactly the batches of an uninterrupted one):
``data.color_jitter`` (brightness, contrast and saturation of each crop; hue is kept, since captions name colours),
``data.token_drop`` (caption tokens dropped at random, the caption closed up: a cheap text augmentation that
also shortens the packed text tower's work) and ``data.cutout`` (a square of each image filled with the
normalisation mean, DeVries and Taylor 2017).
"""
from __future__ import annotations

import torch


def check_augment(color_jitter: float, token_drop: float, cutout: int = 0, size: int | None = None) -> None:
    if not 0 <= color_jitter < 1:
        raise ValueError(f"data.color_jitter: {color_jitter} is not in [0, 1)")
    if not 0 <= token_drop < 1:
        raise ValueError(f"data.token_drop: {token_drop} is not in [0, 1)")
    if isinstance(cutout, bool) or not isinstance(cutout, int) or cutout < 0 or (size is not None and cutout >= size):
        raise ValueError(f"data.cutout: {cutout!r} is not a square side in pixels from 0 (off) to below the image "
                         f"size{f' {size}' if size is not None else ''}")


def augmenting(opts) -> bool:
    """Whether ``opts`` (:class:`vlp.data.StreamOptions`) turns on any batch augmentation."""
    return bool(opts.color_jitter or opts.token_drop or opts.cutout)


def augment_batch(images: torch.Tensor, tokens: torch.Tensor | None, opts,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``images`` (n, 3, h, w) on the uint8 grid [0, 255] (uint8, or floats as the in-memory crops are) and
    ``tokens`` (or None) with the augmentations ``opts`` (:class:`vlp.data.StreamOptions`) turns on, drawn in this
    order from a generator seeded with ``seed`` (a new one goes last, so older ones keep their draws). Augmented
    images are rounded back to the grid and keep their dtype."""
    generator = torch.Generator().manual_seed(seed)
    if opts.color_jitter:
        jittered = jitter_colors(images.float(), opts.color_jitter, generator).round_().clamp_(0, 255)
        images = jittered.to(images.dtype)
    if opts.token_drop and tokens is not None:
        tokens = drop_tokens(tokens, opts.token_drop, generator)
    if opts.cutout:
        fill = [round(255 * m) for m in opts.image.mean]  # zero once normalised
        images = cut_out(images, opts.cutout, fill, generator)
    return images, tokens


def cut_out(images: torch.Tensor, side: int, fill: list[int], generator: torch.Generator) -> torch.Tensor:
    """Fill a ``side`` x ``side`` square of each image with ``fill`` (one value per channel). The square's centre
    is uniform over the image, so near an edge only part of it lands on the image."""
    n, _, h, w = images.shape
    centre_y = torch.randint(0, h, (n, 1, 1), generator=generator)
    centre_x = torch.randint(0, w, (n, 1, 1), generator=generator)
    top, left = centre_y - side // 2, centre_x - side // 2
    rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    inside = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)  # (n, h, w)
    value = torch.tensor(fill, dtype=images.dtype).view(1, -1, 1, 1)
    return torch.where(inside.unsqueeze(1), value, images)


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
