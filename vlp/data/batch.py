"""The batch dict both training loaders yield (the stream, vlp/data/stream.py, and data.in_memory,
vlp/data/memory.py), built in one place so that the two cannot drift apart in keys, dtypes or augmentation order.

Keys: ``image`` (N, 3, S, S), float32 normalised or uint8 with ``normalize`` off; ``text``, the token rows
(N*k of them with ``captions_per_sample`` k, image-major: image i's captions at rows i*k..i*k+k-1), or the caption
strings when there is no tokenizer; ``caption``, per image a string, or a list of k; ``uid``, ``key``, ``kind``,
``meta`` per image; ``label``, ``identity`` and ``source`` (the index of the sample's source in a mix) as int64;
with an attribute vocabulary (``data.attributes``: slot -> values), ``attributes`` (N, slots) int64, each entry the
index of the sample's ``json["attributes"][slot]`` among that slot's values, -1 where absent or not listed.
"""
from __future__ import annotations

import torch

from vlp.data.augment import augment_batch
from vlp.data.preprocess import normalize_batch


def check_attribute_vocabulary(vocabulary, key: str = "data.attributes") -> None:
    """``{slot: [value, ...]}`` with distinct string values, at least two per slot."""
    if not isinstance(vocabulary, dict):
        raise ValueError(f"{key}: expected a mapping slot -> list of values, got {vocabulary!r}")
    for slot, values in vocabulary.items():
        if (not isinstance(values, (list, tuple)) or len(values) < 2 or len(set(values)) != len(values)
                or not all(isinstance(v, str) for v in values)):
            raise ValueError(f"{key}.{slot}: {values!r} is not a list of two or more distinct names")


def attribute_ids(rows: list[dict], vocabulary: dict) -> torch.Tensor:
    """(N, slots) int64: each row's ``meta["attributes"]`` value index per slot of ``vocabulary``, -1 if unknown."""
    index = {slot: {v: i for i, v in enumerate(values)} for slot, values in vocabulary.items()}
    return torch.tensor([[index[slot].get((r["meta"].get("attributes") or {}).get(slot), -1) for slot in vocabulary]
                         for r in rows], dtype=torch.long).view(len(rows), len(vocabulary))


def collate(rows: list[dict], texts: list[list[str]], images: torch.Tensor, tokens: torch.Tensor | None, opts,
            augment_seed: int | None = None) -> dict:
    """The batch of ``rows`` (parsed samples: ``uid``, ``key``, ``kind``, ``label``, ``identity``, ``source``,
    ``meta``), their drawn captions ``texts`` (k per row), their crops ``images`` (uint8, or floats on the uint8 grid)
    and the captions' ``tokens`` (or None). With ``augment_seed``, the batch augmentations that ``opts``
    (:class:`vlp.data.StreamOptions`) turns on are drawn from it before images are normalised."""
    if augment_seed is not None:
        images, tokens = augment_batch(images, tokens, opts, augment_seed)
    images = normalize_batch(images, opts.image.mean, opts.image.std) if opts.normalize else images.to(torch.uint8)
    batch = {
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
    if opts.attributes:
        batch["attributes"] = attribute_ids(rows, opts.attributes)
    return batch
