"""Zero-shot image-text retrieval over images with several captions each (Flickr, COCO)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlp.eval.datasets import DatasetError
from vlp.eval.features import FeatureStore
from vlp.eval.metrics import retrieval_metrics
from vlp.eval.tasks import Evaluator, register_task


@register_task("zeroshot_retrieval")
class ZeroShotRetrieval(Evaluator):
    needs = ("retrieval",)

    @dataclass
    class Options:
        recall_k: list[int] = field(default_factory=lambda: [1, 5, 10])

    def check(self) -> None:
        super().check()
        if not self.options.recall_k or any(not isinstance(k, int) or k < 1 for k in self.options.recall_k):
            raise DatasetError(f"{self.where}: recall_k must be a list of positive integers, "
                               f"got {self.options.recall_k!r}")

    def run(self, store: FeatureStore) -> dict[str, float]:
        images = store.images(self.dataset.image_set())
        texts, owner = [], []
        for i, record in enumerate(images.records):
            captions = record.get("captions") or []
            texts.extend(captions)
            owner.extend([i] * len(captions))
        if not texts:
            raise DatasetError(f"{self.where}: dataset {self.dataset.name!r} has no captions")
        text_features = store.texts(texts, desc="captions")
        self.counts = {"images": len(images.records), "texts": len(texts)}
        metrics = retrieval_metrics(text_features, images.features, torch.tensor(owner), tuple(self.options.recall_k))
        return {**metrics, "images": len(images.records), "texts": len(texts)}

    def main_metric(self, metrics: dict[str, float]) -> str:
        return "mean_recall@1" if "mean_recall@1" in metrics else f"image_retrieval_recall@{self.options.recall_k[0]}"
