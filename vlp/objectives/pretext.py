"""PLIP's pretext objectives (Zuo et al. 2023, "PLIP: Language-Image Pre-training for Person Representation
Learning"), each on a part of the model (vlp/models/parts.py) that computes its outputs:

- ``attributes``: image-guided attribute prediction, cross-entropy of an ``attribute_head``'s logits against the
  batch's ``attributes`` (``data.attributes``: one value index per slot, -1 unknown and ignored), averaged over the
  slots that have a known value in the batch;
- ``colorize``: text-guided image colorization, L1 distance between a ``colorizer``'s predicted chroma and the
  image's own (YCbCr Cb and Cr on a coarse grid).

The third, identity-based vision-language contrast, is ``group_contrast`` with ``field: identity``
(vlp/objectives/group.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vlp.objectives import OBJECTIVES, Objective


@OBJECTIVES.register("attributes")
class AttributeObjective(Objective):
    """``head``: the ``attribute_head`` part's name; ``classes``: the value count of each slot (its own option
    again, so that the objective can split the logits without the model at hand)."""
    fields = ("attributes",)

    def __init__(self, head: str = "attributes", classes: list[int] | None = None):
        super().__init__()
        if not classes or not all(isinstance(c, int) and c >= 2 for c in classes):
            raise ValueError(f"objectives.attributes.options.classes: {classes!r} is not a list of value counts, one "
                             "per slot of data.attributes")
        self.head, self.classes = head, list(classes)
        self.reads = (head,)

    def forward(self, out: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        if self.head not in out:
            raise ValueError(f"objectives.attributes: the model has no output {self.head!r} (its outputs: "
                             f"{', '.join(out)}): add an attribute_head of that name under model.parts")
        logits, targets = out[self.head].float(), batch["attributes"]
        if targets.shape[1] != len(self.classes) or logits.shape[1] != sum(self.classes):
            raise ValueError(f"objectives.attributes: {targets.shape[1]} slots in data.attributes and "
                             f"{logits.shape[1]} logits, for classes {self.classes}: make them agree")
        losses, metrics = [], {}
        for slot, (part, target) in enumerate(zip(logits.split(self.classes, dim=1), targets.unbind(1))):
            known = target >= 0
            if not known.any():
                continue
            losses.append(F.cross_entropy(part[known], target[known]))
            metrics[f"attr{slot}_acc"] = (part[known].argmax(1) == target[known]).float().mean().detach()
        if not losses:  # no slot known in this batch: a zero that keeps the head in the graph
            return logits.sum() * 0.0, metrics
        return torch.stack(losses).mean(), metrics


@OBJECTIVES.register("colorize")
class ColorizeObjective(Objective):
    """``head``: the ``colorizer`` part's name (outputs ``<head>`` and ``<head>_target``)."""

    def __init__(self, head: str = "colorizer"):
        super().__init__()
        self.head = head
        self.reads = (head, f"{head}_target")

    def forward(self, out: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        if self.head not in out:
            raise ValueError(f"objectives.colorize: the model has no output {self.head!r} (its outputs: "
                             f"{', '.join(out)}): add a colorizer of that name under model.parts")
        prediction, target = out[self.head].float(), out[f"{self.head}_target"].float()
        loss = F.l1_loss(prediction, target)
        # the L1 of predicting grey everywhere: the floor a decoder that learnt nothing would sit at
        return loss, {"colorize_grey_l1": target.abs().mean().detach()}
