"""Contrast by group (UniCL, Yang et al. 2022, "Unified Contrastive Learning in Image-Text-Label Space"): an image's
positives are its own text and every text of a sample in its group, and the other way round.

The group is a batch field (``field``: ``label`` by default, or ``identity``); a sample whose field is negative (no
label: caption data) is a group of its own, so caption pairs keep their one positive, as in CLIP. Each row's target
spreads evenly over its positives (M_ij / sum_j M_ij), and the loss is the cross-entropy against it, averaged over
both directions. Features and groups are gathered across ranks (features with gradients, as the clip objective), so
N ranks with batch B compute the loss and gradient of one process with batch N*B. Label-aware targets for class
data (Saito et al. 2023 use them with prefix conditioning) and identity-level contrast for person data (PLIP's
identity-based vision-language contrast) are this one objective with another field.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip.loss import gather_features

from vlp.objectives import OBJECTIVES, Objective, caption_groups


def group_targets(groups: torch.Tensor) -> torch.Tensor:
    """Row-normalised targets: i and j are positives when i == j or they share a group (non-negative)."""
    same = (groups[:, None] == groups[None, :]) & (groups[:, None] >= 0)
    same |= torch.eye(len(groups), dtype=torch.bool, device=groups.device)
    targets = same.float()
    return targets / targets.sum(1, keepdim=True)


@OBJECTIVES.register("group_contrast")
class GroupContrastObjective(Objective):
    def __init__(self, field: str = "label", rank: int = 0, world_size: int = 1):
        super().__init__()
        self.field, self.rank, self.world_size = field, rank, world_size
        self.fields = (field,)

    def _gather_groups(self, groups: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return groups
        parts = [torch.empty_like(groups) for _ in range(self.world_size)]
        dist.all_gather(parts, groups)
        return torch.cat(parts)

    def _loss(self, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, targets: torch.Tensor):
        if self.world_size > 1:
            image, text = gather_features(image, text, gather_with_grad=True, rank=self.rank,
                                          world_size=self.world_size)
        logits = scale * image @ text.T
        per_image = -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()
        per_text = -(targets.T * F.log_softmax(logits.T, dim=1)).sum(1).mean()  # targets are symmetric
        return (per_image + per_text) / 2

    def forward(self, out: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        image, scale = out["image_features"], out["logit_scale"]
        groups = self._gather_groups(batch[self.field])
        targets = group_targets(groups)
        texts = caption_groups(image, out["text_features"])
        loss = sum(self._loss(image, text, scale, targets) for text in texts) / len(texts)
        positives = (targets > 0).sum(1).float().mean()
        return loss, {"logit_scale": scale.detach(), "positives_per_row": positives}
