"""Training objectives: small classes with one signature, chosen by name in the config.

An objective is called as ``objective(out, batch) -> (loss, metrics)`` where ``out`` is the model's output
dict (``image_features``, ``text_features``, ``logit_scale`` and, for SigLIP, ``logit_bias``; L2-normalised
features of this rank's batch) and ``batch`` the loader's batch (metadata such as ``label`` and ``identity``
included). Adding one is a class with ``@register("name")`` plus a config line.

With ``data.captions_per_sample`` k > 1 there are k text rows per image, image-major; :func:`caption_groups`
splits them into k aligned sets, and clip and siglip average their loss over the sets.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

OBJECTIVES: dict[str, Callable[..., "Objective"]] = {}


def register(name: str):
    def decorator(cls):
        OBJECTIVES[name] = cls
        return cls

    return decorator


class Objective(nn.Module):
    def forward(self, out: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError


def caption_groups(image_features: torch.Tensor, text_features: torch.Tensor) -> list[torch.Tensor]:
    """Text features of B images with k captions each (rows image-major) as k tensors of B rows, the j-th
    holding every image's j-th caption; one tensor when texts and images pair one to one."""
    n, m = image_features.shape[0], text_features.shape[0]
    if m == n:
        return [text_features]
    if n == 0 or m % n:
        raise ValueError(f"{m} text features for {n} images: expected the same count or k per image")
    grouped = text_features.view(n, m // n, -1)
    return [grouped[:, j].contiguous() for j in range(m // n)]


def build_objective(name: str, options: dict, rank: int = 0, world_size: int = 1, **common) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"objectives: unknown objective {name!r} (known: {', '.join(sorted(OBJECTIVES))})")
    try:
        return OBJECTIVES[name](rank=rank, world_size=world_size, **common, **options)
    except TypeError as e:
        raise ValueError(f"objectives.{name}.options: {e}") from e


from vlp.objectives import contrastive  # noqa: E402,F401 - registers clip and siglip
