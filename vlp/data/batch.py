"""The batch dict both training loaders yield (the stream, vlp/data/stream.py, and data.in_memory,
vlp/data/memory.py), built in one place so that the two cannot drift apart in keys, dtypes or augmentation order.

Keys: ``image`` (N, 3, S, S), float32 normalised or uint8 with ``normalize`` off; ``text``, the token rows
(N*k of them with ``captions_per_sample`` k, image-major: image i's captions at rows i*k..i*k+k-1), or the caption
strings when there is no tokenizer; ``caption``, per image a string, or a list of k; ``uid``, ``key``, ``kind``,
``meta`` per image; ``label``, ``identity`` and ``source`` (the index of the sample's source in a mix) as int64.
"""
from __future__ import annotations

import torch

from vlp.data.augment import augment_batch
from vlp.data.preprocess import normalize_batch


def collate(rows: list[dict], texts: list[list[str]], images: torch.Tensor, tokens: torch.Tensor | None, opts,
            augment_seed: int | None = None) -> dict:
    """The batch of ``rows`` (parsed samples: ``uid``, ``key``, ``kind``, ``label``, ``identity``, ``source``,
    ``meta``), their drawn captions ``texts`` (k per row), their crops ``images`` (uint8, or floats on the uint8 grid)
    and the captions' ``tokens`` (or None). With ``augment_seed``, the batch augmentations that ``opts``
    (:class:`vlp.data.StreamOptions`) turns on are drawn from it before images are normalised."""
    if augment_seed is not None:
        images, tokens = augment_batch(images, tokens, opts, augment_seed)
    images = normalize_batch(images, opts.image.mean, opts.image.std) if opts.normalize else images.to(torch.uint8)
    return {
        "image": images,
        "text": tokens if tokens is not None else [t for group in texts for t in group],
        "caption": [group[0] for group in texts] if opts.captions_per_sample == 1 else texts,
        "uid": [r["uid"] for r in rows],
        "key": [r["key"] for r in rows],
        "kind": [r["kind"] for r in rows],
        "label": torch.tensor([r["label"] for r in rows], dtype=torch.long),
        "identity": torch.tensor([r["identity"] for r in rows], dtype=torch.long),
        "source": torch.tensor([r["source"] for r in rows], dtype=torch.long),
        "meta": [r["meta"] for r in rows],
    }
