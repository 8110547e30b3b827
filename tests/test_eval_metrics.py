"""Metric definitions on hand-built cases, and person retrieval against a direct implementation of IRRA's formulas."""
from __future__ import annotations

import math

import pytest
import torch

from vlp.eval.metrics import (classification_metrics, first_positive_rank, person_retrieval_metrics,
                              retrieval_metrics)


# -- zero-shot classification -------------------------------------------------------------------------------
def test_classification_hand_built():
    logits = torch.tensor([
        [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # label 0: top-1
        [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],  # label 5: rank 6, outside the top 5
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # label 1: rank 5, inside the top 5
        [0.0, 0.0, 0.7, 0.0, 0.0, 0.0],  # label 2: top-1
    ])
    target = torch.tensor([0, 5, 1, 2])
    m = classification_metrics(logits, target)
    assert m["acc1"] == 0.5
    assert m["acc5"] == 0.75
    # classes present: 0 (1/1), 5 (0/1), 1 (0/1), 2 (1/1); absent classes do not count (sklearn's rule)
    assert m["mean_per_class_recall"] == 0.5


def test_classification_fewer_than_five_classes_gives_nan_acc5():
    m = classification_metrics(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), torch.tensor([0, 1]))
    assert m["acc1"] == 0.5 and math.isnan(m["acc5"])


def test_classification_ties_keep_index_order():
    """All logits equal: the stable rule ranks class 0 first, so only class-0 images count as hits."""
    target = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9])
    m = classification_metrics(torch.zeros(12, 10), target)
    assert m["acc1"] == 2 / 12
    assert m["acc5"] == 6 / 12  # classes 0..4
    assert m["mean_per_class_recall"] == pytest.approx(1 / 10)


def test_classification_rejects_labels_outside_the_classes():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        classification_metrics(torch.zeros(2, 3), torch.tensor([0, 3]))


def test_first_positive_rank_counts_ties_before_the_positive():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.5], [0.1, 0.1, 0.1, 0.1], [0.3, 0.2, 0.1, 0.0]])
    positives = torch.tensor([[False, False, True, False], [False, False, False, True],
                              [False, False, False, False]])
    assert first_positive_rank(scores, positives).tolist() == [2, 3, -1]


# -- image-text retrieval -----------------------------------------------------------------------------------
def test_retrieval_hand_built():
    """Two images, two captions each; features chosen so the ranks are known."""
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.1],    # image 0: right
                         [0.1, 1.0],    # image 0: wrong (points at image 1)
                         [0.2, 1.0],    # image 1: right
                         [1.0, 0.3]])   # image 1: wrong
    m = retrieval_metrics(text, image, torch.tensor([0, 0, 1, 1]), ks=(1, 2))
    assert m["image_retrieval_recall@1"] == 0.5
    assert m["image_retrieval_recall@2"] == 1.0
    # image 0's best caption is caption 0 (rank 0); image 1's best is caption 2, behind caption 1 (rank 1)
    assert m["text_retrieval_recall@1"] == 0.5
    assert m["text_retrieval_recall@2"] == 1.0
    assert m["mean_recall@1"] == 0.5


def test_retrieval_counts_a_hit_when_any_caption_is_in_the_top_k():
    image = torch.eye(3)
    text = torch.tensor([[0.0, 1.0, 0.2], [0.0, 1.0, 0.3], [1.0, 0.0, 0.1], [0.0, 0.0, 1.0]])
    m = retrieval_metrics(text, image, torch.tensor([0, 0, 0, 2]), ks=(1,))
    # image 0's captions: the third one scores highest for it -> a hit at k=1 although two others miss
    assert m["text_retrieval_recall@1"] == 2 / 3  # images 0 and 2 hit; image 1 has no caption
    assert m["image_retrieval_recall@1"] == 2 / 4


# -- person retrieval -----------------------------------------------------------------------------------------
def irra_reference(similarity, q_pids, g_pids, ignore=None, max_rank=10):
    """IRRA's ``rank`` (utils/metrics.py), written out loop by loop, with a stable sort so ties are deterministic;
    ignored gallery items are removed per query (Market-1501 style) and queries without positives skipped."""
    cmc, aps, inps = [], [], []
    for i in range(similarity.shape[0]):
        keep = [j for j in range(similarity.shape[1]) if ignore is None or not ignore[i, j]]
        sims = similarity[i, keep]
        pids = g_pids[keep]
        order = sorted(range(len(keep)), key=lambda j: -float(sims[j]))  # Python's sort is stable
        matches = [int(pids[j] == q_pids[i]) for j in order]
        if sum(matches) == 0:
            continue
        cum = [sum(matches[:r + 1]) for r in range(len(matches))]
        cmc.append([min(c, 1) for c in cum[:max_rank]] + [1] * max(0, max_rank - len(cum)))
        positions = [r for r, m in enumerate(matches) if m]
        aps.append(sum(cum[r] / (r + 1) for r in positions) / len(positions))
        inps.append(cum[positions[-1]] / (positions[-1] + 1))
    cmc = torch.tensor(cmc, dtype=torch.float64).mean(0)
    return {"rank@1": float(cmc[0]), "rank@5": float(cmc[4]), "rank@10": float(cmc[9]),
            "mAP": sum(aps) / len(aps), "mINP": sum(inps) / len(inps), "queries": len(aps)}


def test_person_retrieval_hand_built_values():
    # query 0 (identity 7): positives at ranks 1 and 3 -> AP (1/1 + 2/3)/2, INP 2/3
    # query 1 (identity 8): a single positive at rank 2 -> AP 1/2, INP 1/2, not a rank-1 hit
    sim = torch.tensor([[0.9, 0.8, 0.7, 0.1], [0.9, 0.8, 0.7, 0.1]])
    query = torch.tensor([7, 8])
    m = person_retrieval_metrics(sim, query, torch.tensor([7, 8, 7, 9]), ks=(1, 2))
    assert m["rank@1"] == 0.5 and m["rank@2"] == 1.0
    assert m["mAP"] == pytest.approx(((1 + 2 / 3) / 2 + 1 / 2) / 2)
    assert m["mINP"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    # without identity 8 in the gallery, query 1 has no positive: not scored, but counted
    m = person_retrieval_metrics(sim, query, torch.tensor([7, 9, 7, 9]), ks=(1, 2))
    assert m["queries"] == 1 and m["queries_without_positive"] == 1
    assert m["mAP"] == pytest.approx((1 + 2 / 3) / 2)


def test_person_retrieval_ties_follow_gallery_order():
    sim = torch.tensor([[0.5, 0.5, 0.5]])
    m = person_retrieval_metrics(sim, torch.tensor([1]), torch.tensor([0, 1, 1]), ks=(1,))
    assert m["rank@1"] == 0.0
    assert m["mAP"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert m["mINP"] == pytest.approx(2 / 3)


def test_person_retrieval_ignore_removes_items_from_the_ranking():
    """The query's own image at rank 1 must neither count as a hit nor push the others down."""
    sim = torch.tensor([[1.0, 0.2, 0.6, 0.4]])
    ignore = torch.tensor([[True, False, False, False]])
    gallery = torch.tensor([3, 3, 5, 3])
    m = person_retrieval_metrics(sim, torch.tensor([3]), gallery, ignore, ks=(1, 2))
    # remaining order: 0.6 (id 5), 0.4 (id 3), 0.2 (id 3) -> positives at ranks 2 and 3
    assert m["rank@1"] == 0.0 and m["rank@2"] == 1.0
    assert m["mAP"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert m["mINP"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("seed", range(6))
def test_person_retrieval_equals_the_irra_formulas(seed):
    g = torch.Generator().manual_seed(seed)
    queries, gallery = 9, 14
    # Rounded scores make ties common; a few identities have one gallery image (single-positive queries).
    sim = (torch.rand(queries, gallery, generator=g) * 4).round() / 4
    g_pids = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4, 5, 5, 6])
    q_pids = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, 9])  # identity 9 has no gallery image
    ignore = torch.rand(queries, gallery, generator=g) < 0.15 if seed % 2 else None
    ours = person_retrieval_metrics(sim, q_pids, g_pids, ignore)
    ref = irra_reference(sim, q_pids, g_pids, ignore)
    for key in ("rank@1", "rank@5", "rank@10", "mAP", "mINP", "queries"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-12), key
    assert ours["queries"] + ours["queries_without_positive"] == queries
