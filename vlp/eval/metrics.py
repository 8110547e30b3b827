"""Metrics on embeddings: zero-shot classification, image-text retrieval, person retrieval.

Every ranking here uses one tie rule: candidates are ordered by score, descending, and equal scores keep
their index order (a stable sort). Without ties this is exactly ``torch.topk``, which CLIP_benchmark uses; with
ties (a constant model, duplicated images) it makes every figure reproducible instead of backend-dependent.

The ranks are computed without sorting: the position of a query's best positive is the number of candidates
scoring higher plus the number scoring equal that come earlier, which is linear in the number of candidates.
"""
from __future__ import annotations

import math

import torch

CHUNK = 2048  # query rows scored at once: bounds memory for ImageNet-sized (50k x 1k) score matrices


def first_positive_rank(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """0-based position of the first positive in each row's stable descending order; -1 where a row has none.

    ``scores`` (Q, N) float, ``positives`` (Q, N) bool.
    """
    out = []
    for s, p in zip(scores.split(CHUNK), positives.split(CHUNK)):
        best = torch.where(p, s, torch.full_like(s, -math.inf)).amax(dim=1, keepdim=True)
        at_best = p & (s == best)
        best_index = at_best.int().argmax(dim=1, keepdim=True)  # the earliest positive holding the best score
        index = torch.arange(s.shape[1]).unsqueeze(0)
        rank = (s > best).sum(1) + ((s == best) & (index < best_index)).sum(1)
        out.append(torch.where(p.any(1), rank, torch.full_like(rank, -1)))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def hit_rate(ranks: torch.Tensor, k: int) -> float:
    """Fraction of rows whose first positive is in the top k (rows without a positive count as misses)."""
    if len(ranks) == 0:
        return math.nan
    return int(((ranks >= 0) & (ranks < k)).sum()) / len(ranks)


def classification_metrics(logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """CLIP_benchmark's single-label metrics: ``acc1``, ``acc5`` (NaN below 5 classes, as CLIP_benchmark does)
    and ``mean_per_class_recall`` (balanced accuracy over the classes present in ``target``, sklearn's rule)."""
    logits, target = logits.float(), target.long()
    n, classes = logits.shape
    if n == 0:
        raise ValueError("no samples to score")
    if target.min() < 0 or target.max() >= classes:
        raise ValueError(f"labels must lie in [0, {classes}); got {int(target.min())}..{int(target.max())}")
    ranks = first_positive_rank(logits, torch.nn.functional.one_hot(target, classes).bool())
    pred = logits.argmax(dim=1)  # first maximum: the same winner as rank 0 under the stable tie rule
    recalls = [float((pred[target == c] == c).double().mean()) for c in torch.unique(target).tolist()]
    return {
        "acc1": hit_rate(ranks, 1),
        "acc5": hit_rate(ranks, 5) if classes >= 5 else math.nan,
        "mean_per_class_recall": math.fsum(recalls) / len(recalls),
    }


def retrieval_metrics(text_features: torch.Tensor, image_features: torch.Tensor, text_to_image: torch.Tensor,
                      ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k both ways with CLIP_benchmark's keys. A query scores 1 when at least one correct item is in its
    top k (the CLIP paper's convention): for text->image the one image of the caption, for image->text any of
    the image's captions. Features are L2-normalised here."""
    text = torch.nn.functional.normalize(text_features.float(), dim=-1)
    image = torch.nn.functional.normalize(image_features.float(), dim=-1)
    scores = text @ image.T  # (texts, images)
    positives = torch.zeros_like(scores, dtype=torch.bool)
    positives[torch.arange(len(text)), text_to_image.long()] = True
    by_text = first_positive_rank(scores, positives)
    by_image = first_positive_rank(scores.T.contiguous(), positives.T.contiguous())
    metrics = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = hit_rate(by_text, k)
        metrics[f"text_retrieval_recall@{k}"] = hit_rate(by_image, k)
    if 1 in ks:  # DataComp's single retrieval figure
        metrics["mean_recall@1"] = (metrics["image_retrieval_recall@1"] + metrics["text_retrieval_recall@1"]) / 2
    return metrics


def person_retrieval_metrics(similarity: torch.Tensor, query_ids: torch.Tensor, gallery_ids: torch.Tensor,
                             ignore: torch.Tensor | None = None,
                             ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Identity-level retrieval as the IRRA protocol (Jiang & Ye, CVPR 2023, ``utils/metrics.py``) computes it:
    every gallery item of the query's identity is a positive;
    - ``rank@k`` (CMC): fraction of queries with a positive in the top k;
    - ``mAP``: mean over queries of non-interpolated AP = mean over positives of (positives up to it) / (its rank);
    - ``mINP`` (Ye et al., TPAMI 2021): mean over queries of (number of positives) / (rank of the last positive).

    ``ignore`` (Q, G) bool removes gallery items from a query's ranking altogether (the query's own image, or
    the Market-1501 same-camera rule). Queries left without any positive are not scored (IRRA would divide by
    zero); their count is returned as ``queries_without_positive``. Values are fractions, not IRRA's percent.
    """
    similarity = similarity.float()
    q, g = similarity.shape
    if ignore is None:
        ignore = torch.zeros(q, g, dtype=torch.bool)
    matches = query_ids.view(-1, 1) == gallery_ids.view(1, -1)
    valid = (matches & ~ignore).any(1)
    order = torch.sort(similarity, dim=1, descending=True, stable=True).indices
    # Ignored items go to the end (a second stable sort keeps the score order among the rest) and never match.
    order = order.gather(1, torch.sort(ignore.gather(1, order).int(), dim=1, stable=True).indices)
    hits = (matches & ~ignore).gather(1, order)[valid].double()
    metrics: dict[str, float] = {}
    if len(hits) == 0:
        metrics.update({f"rank@{k}": math.nan for k in ks} | {"mAP": math.nan, "mINP": math.nan})
    else:
        found = hits.cumsum(1)
        positions = torch.arange(1, g + 1, dtype=torch.float64)
        for k in ks:
            metrics[f"rank@{k}"] = float((found[:, :min(k, g)][:, -1] > 0).double().mean())
        relevant = hits.sum(1)
        ap = (found / positions * hits).sum(1) / relevant
        last = g - hits.flip(1).argmax(1)  # 1-based position of the last positive
        metrics["mAP"] = float(ap.mean())
        metrics["mINP"] = float((relevant / last).mean())
    metrics["queries"] = int(valid.sum())
    metrics["queries_without_positive"] = int((~valid).sum())
    return metrics
