"""Objectives on hand-made features: k captions per image."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlp.objectives import build_objective


def infonce(image: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    logits = scale * image @ text.T
    labels = torch.arange(len(image))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def test_k_captions_per_image_average_k_aligned_clip_losses():
    torch.manual_seed(0)
    b, k = 6, 3
    image = F.normalize(torch.randn(b, 8), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(b * k, 8), dim=-1)  # row k*i + j: image i's j-th caption
    clip = build_objective("clip", {})
    loss, _ = clip({"image_features": image, "text_features": text, "logit_scale": torch.tensor(10.0)}, {})
    expected = sum(infonce(image, text[j::k], 10.0) for j in range(k)) / k
    assert torch.allclose(loss, expected, atol=1e-6)
    # A different pairing of the same rows (caption-major) gives another loss: the layout is what is checked.
    assert not torch.allclose(expected, sum(infonce(image, text[j * b:(j + 1) * b], 10.0) for j in range(k)) / k)
    one, _ = clip({"image_features": image, "text_features": text[::k], "logit_scale": torch.tensor(10.0)}, {})
    assert torch.allclose(one, infonce(image, text[::k], 10.0), atol=1e-6)


def test_siglip_averages_over_caption_sets_too():
    torch.manual_seed(1)
    image, text = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(8, 8), dim=-1)
    siglip = build_objective("siglip", {})
    out = {"image_features": image, "logit_scale": torch.tensor(10.0), "logit_bias": torch.tensor(-5.0)}
    both, _ = siglip({**out, "text_features": text}, {})
    each = [siglip({**out, "text_features": text[j::2]}, {})[0] for j in range(2)]
    assert torch.allclose(both, (each[0] + each[1]) / 2, atol=1e-6)
    for j in range(2):  # Zhai et al. 2023, eq. 1: -sum log sigmoid(z_ij (t x_i.y_j + b)) / |B|, z = +1 on pairs
        logits = 10.0 * image @ text[j::2].T - 5.0
        signs = 2 * torch.eye(4) - 1
        assert torch.allclose(each[j], -F.logsigmoid(signs * logits).sum() / 4, atol=1e-6)


def test_text_rows_that_are_not_a_multiple_of_the_images_are_an_error():
    clip = build_objective("clip", {})
    with pytest.raises(ValueError, match="7 text features for 3 images"):
        clip({"image_features": torch.randn(3, 8), "text_features": torch.randn(7, 8),
              "logit_scale": torch.tensor(1.0)}, {})


def test_clip_label_smoothing_spreads_the_target_over_the_row():
    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    out = {"image_features": image, "text_features": text, "logit_scale": torch.tensor(10.0)}
    plain = build_objective("clip", {})(out, {})[0]
    smooth = build_objective("clip", {"label_smoothing": 0.2})(out, {})[0]
    logits = 10.0 * image @ text.T
    by_hand = 0.0
    for rows in (logits, logits.T):  # target: 0.8 on the pair + 0.2 spread evenly over the 6 columns
        logp = rows.log_softmax(dim=-1)
        by_hand = by_hand + (-(0.8 * logp.diagonal()) - 0.2 * logp.mean(dim=-1)).mean() / 2
    assert torch.allclose(smooth, by_hand, atol=1e-6)
    assert not torch.allclose(smooth, plain, atol=1e-3)
    with pytest.raises(ValueError, match="label_smoothing: 1.0"):
        build_objective("clip", {"label_smoothing": 1.0})
