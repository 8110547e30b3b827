"""Zero-shot classification (Radford et al. 2021, sec. 3.1.4): a classifier from class names x prompt templates."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vlp.eval.datasets import DatasetError
from vlp.eval.features import FeatureStore
from vlp.eval.metrics import classification_metrics
from vlp.eval.tasks import Evaluator, register_task


def zero_shot_classifier(store: FeatureStore, classnames: list[str], templates: list[str]) -> torch.Tensor:
    """(classes, dim): per class, the mean of the L2-normalised embeddings of its prompts, renormalised (the
    prompt ensemble of the CLIP paper, as CLIP_benchmark builds it)."""
    texts = [t.format(c=name) for name in classnames for t in templates]
    embedded = F.normalize(store.texts(texts, desc="prompts"), dim=-1)
    per_class = embedded.view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1)


def labels_of(records: list[dict], classes: int, where: str) -> torch.Tensor:
    labels = torch.tensor([r.get("label", -1) for r in records], dtype=torch.long)
    if (labels < 0).any():
        raise DatasetError(f"{where}: {int((labels < 0).sum())} images have no label")
    if (labels >= classes).any():
        raise DatasetError(f"{where}: label {int(labels.max())} but only {classes} class names")
    return labels


@register_task("zeroshot_classification")
class ZeroShotClassification(Evaluator):
    needs = ("classification",)

    def check(self) -> None:
        super().check()
        if not self.dataset.classnames:
            raise DatasetError(f"{self.where}: dataset {self.dataset.name!r} has no class names")
        if not self.dataset.templates:
            raise DatasetError(f"{self.where}: dataset {self.dataset.name!r} has no prompt templates; give "
                               "templates: (a registry name such as cifar10, a list, or a file) in its definition")

    def run(self, store: FeatureStore) -> dict[str, float]:
        images = store.images(self.dataset.image_set())
        classifier = zero_shot_classifier(store, self.dataset.classnames, self.dataset.templates)
        labels = labels_of(images.records, len(self.dataset.classnames), self.where)
        # CLIP's logit scale of 100 does not change any rank; kept so the logits equal CLIP_benchmark's.
        logits = 100.0 * F.normalize(images.features, dim=-1) @ classifier.T
        self.counts = {"images": len(labels), "texts": len(self.dataset.classnames) * len(self.dataset.templates),
                       "classes": len(self.dataset.classnames)}
        return {**classification_metrics(logits, labels), "images": len(labels)}

    def main_metric(self, metrics: dict[str, float]) -> str:
        return "acc1"
