"""Named extra parts of a vlp model: heads on the towers' outputs, and the text prefix.

A part is chosen by ``type`` in the config's ``model.parts`` section, under a name of the user's choosing::

    model:
      parts:
        prefix: {type: text_prefix, kinds: [caption, label], length: 4}
        label_head: {type: linear_head, input: image_features, classes: 10}
        attributes: {type: attribute_head, classes: [11, 11]}      # PLIP's image-guided attribute prediction
        colorizer: {type: colorizer, resolution: 8}                 # PLIP's text-guided image colorization

Every part is built from ``(spec, **options)``, where ``spec`` (:class:`TowerSpec`) gives the towers' sizes. A head
reads the model's outputs (and the batch fields it names in ``fields``) and adds outputs of its own, named in
``outputs`` with how gradient accumulation merges them (:data:`ROWS`: one row per sample, concatenated over the
micro-batches; :data:`SHARED`: the same value for every sample, a parameter or a function of parameters only).
A part's parameters belong to the model, so the optimizer, DDP/FSDP, the EMA and checkpoints cover them. A part
with ``image_tokens`` set is also handed the model's spatial image encoder (``VLPModel.image_tokens``).
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
    image_width: int = 0  # channels of the image tower's last feature map (VLPModel.image_tokens); 0: unknown
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)  # the normalisation of the model's input images
    std: tuple[float, ...] = (1.0, 1.0, 1.0)


class Part(nn.Module):
    fields: tuple[str, ...] = ()  # batch fields the part reads, moved to the device with the inputs
    outputs: dict[str, str] = {}  # output name -> ROWS or SHARED
    image_tokens: bool = False  # forward also gets the model's image_tokens(images) -> (N, C, h, w)

    def forward(self, out: dict, inputs: dict, image_tokens=None) -> dict:
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

    def forward(self, out: dict, inputs: dict, image_tokens=None) -> dict:
        return {self.name: self.linear(out[self.input])}


@PARTS.register("attribute_head")
class AttributeHead(Part):
    """Image-guided attribute prediction (PLIP, Zuo et al. 2023): one linear classifier per attribute slot on the
    image features, ``classes`` values per slot in ``data.attributes`` order; output ``<name>``, (N, sum(classes))
    logits, slot after slot (the ``attributes`` objective splits them).

    The formulation: every slot of the caption is masked and predicted from the image alone. PLIP masks the attribute
    words of the caption and predicts them from the image with the rest of the caption as context; in a templated
    pseudo-caption the rest is the template, which says nothing of the values, so the context is left out and the
    head costs one matrix product."""

    def __init__(self, spec: TowerSpec, name: str, classes: list[int]):
        super().__init__()
        if not (isinstance(classes, list) and classes and all(isinstance(c, int) and c >= 2 for c in classes)):
            raise ValueError(f"model.parts.{name}.classes: {classes!r} is not a list of value counts (2 or more), "
                             "one per slot of data.attributes")
        self.name, self.classes = name, list(classes)
        self.linear = nn.Linear(spec.embed_dim, sum(classes))
        self.outputs = {name: ROWS}

    def forward(self, out: dict, inputs: dict, image_tokens=None) -> dict:
        return {self.name: self.linear(out["image_features"])}


# ITU-R BT.601 luma and the chroma of full-range YCbCr (JPEG's), on RGB in [0, 1]: a grey pixel has Cb = Cr = 0
LUMA = (0.299, 0.587, 0.114)
CHROMA = ((-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))


@PARTS.register("colorizer")
class Colorizer(Part):
    """Text-guided image colorization (PLIP): the image tower sees a greyscale copy of each image (its luma, BT.601),
    and a small decoder predicts the image's colour from the copy's spatial features conditioned on the caption.

    Colour is the chroma of full-range YCbCr (Cb, Cr in [-0.5, 0.5]; zero for every grey pixel), averaged over a
    ``resolution`` x ``resolution`` grid: the target ``<name>_target`` (N, 2, R, R). The decoder: a 1x1 convolution of
    the last feature map to ``width`` channels, scaled and shifted by the caption's features (FiLM, Perez et al.
    2018), resized to R x R (bilinear), a 3x3 and a 1x1 convolution; output ``<name>`` (N, 2, R, R). The grey copy
    costs one more pass of the image tower per step (its forward and backward)."""
    image_tokens = True

    def __init__(self, spec: TowerSpec, name: str, resolution: int = 8, width: int = 64):
        super().__init__()
        if not spec.image_width:
            raise ValueError(f"model.parts.{name}: the image tower gives no spatial features to colour from")
        if resolution < 1 or width < 1:
            raise ValueError(f"model.parts.{name}: resolution {resolution} and width {width} must be 1 or more")
        self.name, self.resolution = name, resolution
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("luma", torch.tensor(LUMA).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("chroma", torch.tensor(CHROMA).view(2, 3, 1, 1), persistent=False)
        self.reduce = nn.Conv2d(spec.image_width, width, 1)
        self.film = nn.Linear(spec.embed_dim, 2 * width)
        self.decode = nn.Sequential(nn.GELU(), nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
                                    nn.Conv2d(width, 2, 1))
        self.outputs = {name: ROWS, f"{name}_target": ROWS}

    def targets(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(grey copies, normalised as the model's inputs; chroma targets (N, 2, R, R)) of normalised ``images``."""
        rgb = images.float() * self.std + self.mean
        luma = (rgb * self.luma).sum(1, keepdim=True)
        grey = ((luma - self.mean) / self.std).to(images.dtype)
        chroma = F.conv2d(rgb, self.chroma)
        return grey, F.adaptive_avg_pool2d(chroma, self.resolution)

    def forward(self, out: dict, inputs: dict, image_tokens=None) -> dict:
        images = inputs["image"]
        grey, target = self.targets(images)
        tokens = image_tokens(grey)
        text = out["text_features"]
        if text.shape[0] != images.shape[0]:  # k captions per image, image-major: condition on the first
            text = text.view(images.shape[0], -1, text.shape[-1])[:, 0]
        scale, shift = self.film(text).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
        x = self.reduce(tokens) * (1 + scale) + shift
        x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        return {self.name: self.decode(x), f"{self.name}_target": target}
