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


def test_text_rows_that_are_not_a_multiple_of_the_images_are_an_error():
    clip = build_objective("clip", {})
    with pytest.raises(ValueError, match="7 text features for 3 images"):
        clip({"image_features": torch.randn(3, 8), "text_features": torch.randn(7, 8),
              "logit_scale": torch.tensor(1.0)}, {})
