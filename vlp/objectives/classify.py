"""Cross-entropy of a classification head (a ``linear_head`` part of the model) against a batch field.

Samples whose field is negative (no label known: caption data in a mixed batch) take no part. With several
ranks each rank averages over its own labelled samples and DDP averages the ranks, so ranks with very different
numbers of labelled samples weigh their samples unequally.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vlp.objectives import OBJECTIVES, Objective


@OBJECTIVES.register("classify")
class ClassifyObjective(Objective):
    """``head``: the output of the model's head (its part name); ``field``: the batch field holding the class."""

    def __init__(self, head: str, field: str = "label"):
        super().__init__()
        self.head, self.field = head, field
        self.reads = (head,)
        self.fields = (field,)

    def forward(self, out: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        if self.head not in out:
            raise ValueError(f"objectives.classify: the model has no output {self.head!r} (its outputs: "
                             f"{', '.join(out)}): add a head of that name under model.parts")
        logits, target = out[self.head], batch[self.field]
        known = target >= 0
        loss = F.cross_entropy(logits.float(), target.clamp(min=0), reduction="none")
        loss = (loss * known).sum() / known.sum().clamp(min=1)
        accuracy = ((logits.argmax(-1) == target) & known).sum() / known.sum().clamp(min=1)
        return loss, {f"acc_{self.head}": accuracy.detach()}
