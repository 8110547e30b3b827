"""Training objectives: small classes with one signature, chosen by name in the config.

An objective is called as ``objective(out, batch) -> (loss, metrics)``: ``out`` is the model's output dict
(vlp/models/model.py: ``image_features``, ``text_features``, ``logit_scale``, ``logit_bias`` where the model has
one, and each head's outputs) and ``batch`` the step's batch on the device, holding the fields the objective names
in ``fields`` (e.g. ``label``, ``identity``). ``reads`` names the outputs it uses, so that gradient accumulation
can check it knows how to merge each of them. Objectives own no parameters: a trainable part (a head, a decoder)
belongs to the model (``model.parts``), where the optimizer, DDP/FSDP, the EMA and checkpoints cover it.

A constructor takes its options from the config, plus any of ``rank``, ``world_size`` and ``local_loss`` that it
names. Adding an objective is a class with ``@OBJECTIVES.register("name")`` plus a config line.

With ``data.captions_per_sample`` k > 1 there are k text rows per image, image-major; :func:`caption_groups`
splits them into k aligned sets, and clip and siglip average their loss over the sets.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from vlp.registry import Registry, check_options

OBJECTIVES: Registry[type["Objective"]] = Registry("objective")
CONTEXT = ("rank", "world_size", "local_loss")  # what the trainer offers every constructor that asks for it


class Objective(nn.Module):
    reads: tuple[str, ...] = ("image_features", "text_features", "logit_scale")
    fields: tuple[str, ...] = ()

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


def build_objective(name: str, options: dict, key: str | None = None, **context) -> Objective:
    """The objective ``name`` with its config ``options`` and whichever of ``context`` (``CONTEXT``) it takes.
    ``key`` is the config key errors name (default ``objectives.<name>``)."""
    cls = OBJECTIVES.get(name, f"{key}.name" if key else "objectives")
    key = key or f"objectives.{name}"
    accepted = inspect.signature(cls.__init__).parameters
    check_options(cls, options, f"{key}.options", skip=CONTEXT)
    try:
        objective = cls(**{k: v for k, v in context.items() if k in accepted}, **options)
    except TypeError as e:
        raise ValueError(f"{key}.options: {e}") from e
    if any(True for _ in objective.parameters()):
        raise ValueError(f"{key}: objective {name!r} has trainable parameters; put them in the model "
                         "(model.parts) so that the optimizer, DDP/FSDP, the EMA and checkpoints cover them")
    return objective


from vlp.objectives import classify, contrastive, group, pretext  # noqa: E402,F401 - register their objectives
