"""Person retrieval for identity-level models: text->image and image->image over a query/gallery split.

Every gallery image of the query's identity is a positive; metrics are IRRA's (rank-k CMC, mAP, mINP; see
:func:`vlp.eval.metrics.person_retrieval_metrics`). Image queries never see their own image: in sets where the
query images are also in the gallery (the shared pedestrian set: 17 of 28) a query would otherwise find itself
at rank 1. A gallery file is the query's own image when it is the same picture, whatever its encoding: same stored
size and decoded pixels equal up to re-encoding noise (:data:`vlp.eval.images.SAME_PICTURE`), so a PNG re-save or a
JPEG re-encode of the query is caught. ``gallery_rule`` says what else is removed from an image query's gallery:
- ``same_image``: only the query's own image;
- ``same_camera``: every gallery image of the query's identity taken by the query's camera (Market-1501's rule,
  Zheng et al. 2015), which includes the query's own image.
Text queries (captions of query images, when the dataset has them) rank the full gallery: IRRA's protocol.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vlp.eval.datasets import DatasetError, IdentityDataset
from vlp.eval.features import Embedded, FeatureStore
from vlp.eval.images import same_picture
from vlp.eval.metrics import person_retrieval_metrics
from vlp.eval.tasks import Evaluator, register_task

RULES = {
    "same_image": "image->image: the query's own image (same picture, any encoding) removed from its gallery",
    "same_camera": "image->image: gallery images of the query's identity from the query's camera removed "
                   "(Market-1501)",
}


def _codes(query: list, gallery: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Equal values -> equal integers; None never equals anything (an unknown camera)."""
    table: dict = {}

    def code(values, start):
        return torch.tensor([-(start + i) - 1 if v is None else table.setdefault(v, len(table))
                             for i, v in enumerate(values)], dtype=torch.long)
    return code(query, 0), code(gallery, len(query))


def ignore_mask(query: Embedded, gallery: Embedded, rule: str) -> torch.Tensor:
    """(queries, gallery) bool: the gallery items each image query must not see."""
    mask = same_picture(query.column("picture"), gallery.column("picture"))
    if rule == "same_camera":
        q, g = _codes(list(zip(query.column("identity"), query.column("camera"))),
                      list(zip(gallery.column("identity"), gallery.column("camera"))))
        mask |= q.view(-1, 1) == g.view(1, -1)
    return mask


@register_task("person_retrieval")
class PersonRetrieval(Evaluator):
    needs = ("identity",)

    @dataclass
    class Options:
        ranks: list[int] = field(default_factory=lambda: [1, 5, 10])
        gallery_rule: str = "same_image"
        text: bool = True  # text->image when the dataset has query captions
        image: bool = True  # image->image

    def check(self) -> None:
        super().check()
        if self.options.gallery_rule not in RULES:
            raise DatasetError(f"{self.where}: gallery_rule must be one of {sorted(RULES)}, "
                               f"got {self.options.gallery_rule!r}")
        if self.options.gallery_rule == "same_camera" and isinstance(self.dataset, IdentityDataset):
            try:
                self.dataset.check_cameras("same_camera")
            except DatasetError as e:
                raise DatasetError(f"{self.where}: {e}") from None
        if not (self.options.image or (self.options.text and self.dataset.options.captions)):
            raise DatasetError(f"{self.where}: nothing to evaluate (image: false, and no text queries)")

    def run(self, store: FeatureStore) -> dict[str, float]:
        gallery = store.images(self.dataset.image_set("gallery"))
        ids = {name: i for i, name in enumerate(sorted(set(gallery.column("identity"))))}

        def identity_tensor(names):  # identities absent from the gallery get fresh ids: they have no positive
            return torch.tensor([ids.setdefault(n, len(ids)) for n in names], dtype=torch.long)

        gallery_ids = identity_tensor(gallery.column("identity"))
        g = F.normalize(gallery.features, dim=-1)
        metrics: dict[str, float] = {"gallery": len(gallery.records)}
        ks = tuple(self.options.ranks)
        self.counts = {"images": len(gallery.records), "texts": 0, "identities": len(ids)}
        if self.options.image:
            query = store.images(self.dataset.image_set("query"))
            self.counts["images"] += len(query.records)
            sim = F.normalize(query.features, dim=-1) @ g.T
            found = person_retrieval_metrics(sim, identity_tensor(query.column("identity")), gallery_ids,
                                             ignore_mask(query, gallery, self.options.gallery_rule), ks)
            metrics.update({f"image_to_image_{k}": v for k, v in found.items()})
        text_queries = self.dataset.text_queries() if self.options.text else []
        self.counts["texts"] = len(text_queries)
        if text_queries:
            t = F.normalize(store.texts([c for _, c in text_queries], desc="query captions"), dim=-1)
            found = person_retrieval_metrics(t @ g.T, identity_tensor([p for p, _ in text_queries]), gallery_ids,
                                             None, ks)
            metrics.update({f"text_to_image_{k}": v for k, v in found.items()})
        return metrics

    def main_metric(self, metrics: dict[str, float]) -> str:
        mode = "text_to_image" if "text_to_image_rank@1" in metrics else "image_to_image"
        return f"{mode}_rank@{self.options.ranks[0]}"

    def protocol(self) -> str | None:
        return RULES[self.options.gallery_rule] if self.options.image else "text->image over the full gallery"
