"""Named extra parts of a vlp model: heads on the towers' outputs, and the text prefix.

A part is chosen by ``type`` in the config's ``model.parts`` section, under a name of the user's choosing::

    model:
      parts:
        prefix: {type: text_prefix, kinds: [caption, label], length: 4}
        label_head: {type: linear_head, input: image_features, classes: 10}

Every part is built from ``(spec, **options)``, where ``spec`` (:class:`TowerSpec`) gives the towers' sizes. A head
reads the model's outputs (and the batch fields it names in ``fields``) and adds outputs of its own, named in
``outputs`` with how gradient accumulation merges them (:data:`ROWS`: one row per sample, concatenated over the
micro-batches; :data:`SHARED`: the same value for every sample, a parameter or a function of parameters only).
A part's parameters belong to the model, so the optimizer, DDP/FSDP, the EMA and checkpoints cover them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlp.registry import Registry, check_options

ROWS = "rows"  # one row per sample (or per text row): concatenated over micro-batches
SHARED = "shared"  # independent of the samples: taken once per step

PARTS: Registry[type["Part"]] = Registry("model part")


@dataclass(frozen=True)
class TowerSpec:
    """What a part may need to know of the open_clip model it is attached to."""
    embed_dim: int  # width of the image and text features
    text_width: int  # width of the text tower's token embeddings (0: not open_clip's CLIP text tower)
    context_length: int


class Part(nn.Module):
    fields: tuple[str, ...] = ()  # batch fields the part reads, moved to the device with the inputs
    outputs: dict[str, str] = {}  # output name -> ROWS or SHARED

    def forward(self, out: dict, inputs: dict) -> dict:
        """Outputs computed from the model's outputs so far (``out``) and its inputs."""
        raise NotImplementedError


def check_part(name: str, options) -> tuple[type["Part"], dict]:
    """The class of part ``name`` and its options without ``type``; a ValueError naming the config key if the type
    is unknown or the options do not fit it."""
    key = f"model.parts.{name}"
    if not isinstance(options, dict):
        raise ValueError(f"{key}: expected a mapping with a type, got {options!r}")
    options = dict(options)
    cls = PARTS.get(options.pop("type", None), f"{key}.type")
    check_options(cls, options, key, skip=("spec", "name"))
    return cls, options


def build_part(name: str, options: dict, spec: TowerSpec) -> Part:
    cls, options = check_part(name, options)
    return cls(spec=spec, name=name, **options)


@PARTS.register("text_prefix")
class TextPrefix(Part):
    """``length`` learned vectors per text kind (``kinds``: the batch's ``kind`` values it knows), inserted after the
    start token of the text tower (vlp/models/text.py). The first kind is the default of ``encode_text``:
    zero-shot transfer uses the caption prefix (Saito et al. 2023)."""
    fields = ("kind",)

    def __init__(self, spec: TowerSpec, name: str, kinds: list[str], length: int = 4):
        super().__init__()
        if not spec.text_width:
            raise ValueError(f"model.parts.{name}: a text prefix needs open_clip's CLIP text tower")
        if not kinds or len(set(kinds)) != len(kinds) or not all(isinstance(k, str) for k in kinds):
            raise ValueError(f"model.parts.{name}.kinds: {kinds!r} is not a list of distinct names")
        if not 1 <= length < spec.context_length - 2:
            raise ValueError(f"model.parts.{name}.length: {length} is not in 1..{spec.context_length - 3}")
        self.kinds = list(kinds)
        self.length = length
        # initialised like open_clip's token embedding (std 0.02)
        self.vectors = nn.Parameter(torch.randn(len(kinds), length, spec.text_width) * 0.02)

    def kind_ids(self, kinds: list[str]) -> torch.Tensor:
        try:
            return torch.tensor([self.kinds.index(k) for k in kinds], dtype=torch.long)
        except ValueError:
            unknown = sorted(set(kinds) - set(self.kinds))
            raise ValueError(f"text kind {unknown[0]!r} has no prefix (the model's prefix kinds: "
                             f"{', '.join(self.kinds)})") from None

    def vectors_for(self, kind_ids: torch.Tensor) -> torch.Tensor:
        """(rows, length, width): each row's kind's vectors. A one-hot product, not a gather: every kind's vectors
        take part in the graph (DDP needs each parameter used) and the backward adds no repeated indices."""
        onehot = F.one_hot(kind_ids, len(self.kinds)).to(self.vectors.dtype)
        return (onehot @ self.vectors.flatten(1)).view(len(kind_ids), self.length, -1)


@PARTS.register("linear_head")
class LinearHead(Part):
    """A linear classifier on one of the model's per-sample outputs (``input``: ``image_features`` or
    ``text_features``), giving ``<name>`` logits over ``classes``. A probe trained with the model, or the
    simplest head for label data."""

    def __init__(self, spec: TowerSpec, name: str, classes: int, input: str = "image_features"):
        super().__init__()
        if input not in ("image_features", "text_features"):
            raise ValueError(f"model.parts.{name}.input: {input!r} is not image_features or text_features")
        if classes < 2:
            raise ValueError(f"model.parts.{name}.classes: {classes} (need 2 or more)")
        self.name, self.input = name, input
        self.linear = nn.Linear(spec.embed_dim, classes)
        self.outputs = {name: ROWS}

    def forward(self, out: dict, inputs: dict) -> dict:
        return {self.name: self.linear(out[self.input])}
