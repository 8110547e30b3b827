"""Training objectives: small classes with one signature, chosen by name in the config.

An objective is called as ``objective(out, batch) -> (loss, metrics)`` where ``out`` is the model's output
dict (``image_features``, ``text_features``, ``logit_scale`` and, for SigLIP, ``logit_bias``; L2-normalised
features of this rank's batch) and ``batch`` the loader's batch (metadata such as ``label`` and ``identity``
included). Adding one is a class with ``@register("name")`` plus a config line.
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


def build_objective(name: str, options: dict, rank: int = 0, world_size: int = 1, **common) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"objectives: unknown objective {name!r} (known: {', '.join(sorted(OBJECTIVES))})")
    try:
        return OBJECTIVES[name](rank=rank, world_size=world_size, **common, **options)
    except TypeError as e:
        raise ValueError(f"objectives.{name}.options: {e}") from e


from vlp.objectives import contrastive  # noqa: E402,F401 - registers clip and siglip
