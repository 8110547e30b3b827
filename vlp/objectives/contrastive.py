"""CLIP (InfoNCE, Radford et al. 2021) and SigLIP (sigmoid, Zhai et al. 2023) on open_clip's reference losses.

Across ranks, features are gathered WITH gradients (``torch.distributed.nn.all_gather``), so N processes with
per-rank batch B compute the loss and, after DDP's gradient averaging, the gradient of one process with batch
N*B. (open_clip's default, gathering without gradients, gives 1/N of that gradient.) ``local_loss`` computes
only this rank's rows of the logit matrix (memory O(B*N*B) instead of O((N*B)^2)); the gradient is the same.

With k captions per image (``data.captions_per_sample``) the loss is the mean of k ordinary losses, the j-th pairing
every image with its j-th caption: the images are encoded once, each set of captions keeps the usual negatives
(the other images' captions of the same set), and no image's own captions ever count as its negatives.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from vlp.objectives import OBJECTIVES, Objective, caption_groups


@OBJECTIVES.register("clip")
class ClipObjective(Objective):
    """``label_smoothing`` (option, default 0): each row's target keeps 1 - s on its pair and spreads s evenly
    over all columns, as ``torch.nn.functional.cross_entropy(label_smoothing=s)`` does."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_loss: bool = False, label_smoothing: float = 0.0):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"objectives.clip.options.label_smoothing: {label_smoothing} is not in [0, 1)")
        self.label_smoothing = label_smoothing
        self.loss = ClipLoss(local_loss=local_loss, gather_with_grad=True, cache_labels=True, rank=rank,
                             world_size=world_size)

    def _pair_loss(self, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if not self.label_smoothing:
            return self.loss(image, text, scale)
        per_image, per_text = self.loss.get_logits(image, text, scale)
        labels = self.loss.get_ground_truth(image.device, per_image.shape[0])
        return (F.cross_entropy(per_image, labels, label_smoothing=self.label_smoothing)
                + F.cross_entropy(per_text, labels, label_smoothing=self.label_smoothing)) / 2

    def forward(self, out: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        image, scale = out["image_features"], out["logit_scale"]
        groups = caption_groups(image, out["text_features"])
        loss = sum(self._pair_loss(image, text, scale) for text in groups) / len(groups)
        return loss, {"logit_scale": out["logit_scale"].detach()}


@OBJECTIVES.register("siglip")
class SigLipObjective(Objective):
    reads = ("image_features", "text_features", "logit_scale", "logit_bias")

    def __init__(self, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.loss = SigLipLoss(rank=rank, world_size=world_size)

    def forward(self, out: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        if out.get("logit_bias") is None:
            raise ValueError("objectives.siglip needs a model with a logit bias: set model.init_logit_bias (e.g. -10)")
        image, scale, bias = out["image_features"], out["logit_scale"], out["logit_bias"]
        groups = caption_groups(image, out["text_features"])
        loss = sum(self.loss(image, text, scale, bias) for text in groups) / len(groups)
        return loss, {"logit_scale": out["logit_scale"].detach(), "logit_bias": out["logit_bias"].detach()}
