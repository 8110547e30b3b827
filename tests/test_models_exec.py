"""Execution changes that keep the weights: convolutions trimmed of padding-only taps (the packed text tower is
tested in tests/test_models.py); each computes what the plain model computes, with the same gradients."""
from __future__ import annotations

import copy
import itertools

import open_clip
import pytest
import torch

import vlp.models  # noqa: F401  (registers vlp's model configs)
from vlp.models.trim import TrimmedConv2d, live_window, trim_dead_taps, trimmed_names


def test_live_window_of_small_feature_maps():
    assert live_window(size=1, kernel=3, stride=1, padding=1) == (1, 1)  # a 1x1 map: the centre tap only
    assert live_window(size=2, kernel=3, stride=2, padding=1) == (1, 2)  # 2 -> 1 pixel: the first tap reads padding
    assert live_window(size=2, kernel=3, stride=1, padding=1) == (0, 2)  # 2 -> 2: every tap reads data somewhere
    assert live_window(size=8, kernel=3, stride=1, padding=1) == (0, 2)


@pytest.mark.parametrize("dilation", [1, 2])
def test_every_trimmed_convolution_equals_the_plain_one(dilation):
    torch.manual_seed(0)
    paths = {False: 0, True: 0}  # trimmed convolutions computed as a narrower convolution / as a linear layer
    for size, kernel, stride, padding in itertools.product(range(1, 7), range(1, 6), range(1, 4), range(0, 3)):
        if size + 2 * padding < dilation * (kernel - 1) + 1:
            continue  # no output
        conv = torch.nn.Conv2d(3, 4, kernel, stride=stride, padding=padding, dilation=dilation)
        x = torch.randn(2, 3, size, size)
        expected = conv(x)
        assert trim_dead_taps(conv) == (padding > 0) and isinstance(conv, TrimmedConv2d) == (padding > 0)
        got = conv(x)
        if padding and conv.trims[(size, size)] is not None:
            paths[conv.trims[(size, size)][2]] += 1
        assert got.shape == expected.shape, (size, kernel, stride, padding)
        assert torch.allclose(got, expected, atol=1e-5), (size, kernel, stride, padding)
    # both ways of computing a trim are compared with the plain convolution (the linear one only undilated)
    assert paths == ({False: 7, True: 27} if dilation == 1 else {False: 21, True: 0})


def test_resnet_at_32_px_trims_its_last_stage_and_keeps_outputs_gradients_and_weights():
    torch.manual_seed(0)
    model = open_clip.create_model("vlp-r10t-32-t2")
    for bn in model.visual.modules():  # timm starts each block's last BatchNorm at 0, which stops the gradient
        if isinstance(bn, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(bn.weight, 0.5, 1.5)
    plain = copy.deepcopy(model)
    trim_dead_taps(model.visual)
    assert model.state_dict().keys() == plain.state_dict().keys()
    assert all(v.shape == plain.state_dict()[k].shape for k, v in model.state_dict().items())

    x = torch.randn(6, 3, 32, 32)
    out, ref = model.visual(x), plain.visual(x)
    assert torch.allclose(out, ref, atol=1e-5)
    # the last stage sees 2x2 maps (its first conv, stride 2) and 1x1 maps (its second); the rest read data with
    # every tap
    assert trimmed_names(model.visual) == ["trunk.layer4.0.conv1", "trunk.layer4.0.conv2"]
    # both read the whole map with their live taps and give one pixel: each is a matrix product with those taps
    # (the 2x2 map's last row and column of taps, stride 2; the 1x1 map's centre tap)
    live = (0, 0), True  # no padding left, computed as a linear layer
    assert model.visual.trunk.layer4[0].conv1.trims == {(2, 2): ((slice(1, 3), slice(1, 3)), *live)}
    assert model.visual.trunk.layer4[0].conv2.trims == {(1, 1): ((slice(1, 2), slice(1, 2)), *live)}
    out.square().sum().backward()
    ref.square().sum().backward()
    for (name, p), q in zip(model.visual.named_parameters(), plain.visual.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-4 * q.grad.abs().max() + 1e-7), name
    conv1, conv2 = (model.visual.trunk.layer4[0].conv1.weight.grad, model.visual.trunk.layer4[0].conv2.weight.grad)
    assert (conv2[:, :, 1, 1] != 0).float().mean() > 0.5 and (conv1[:, :, 1:, 1:] != 0).float().mean() > 0.5
    # the taps that read only padding learn nothing, as in the plain convolution
    assert conv2[:, :, [0, 2]].abs().max() == 0 and conv2[:, :, :, [0, 2]].abs().max() == 0
    assert conv1[:, :, 0].abs().max() == 0 and conv1[:, :, :, 0].abs().max() == 0
    with torch.no_grad():  # at 64 px the last stage sees 4x4 and 2x2 maps: every tap reads data there
        y = torch.randn(2, 3, 64, 64)
        assert torch.allclose(model.visual(y), plain.visual(y), atol=1e-5)
        assert model.visual.trunk.layer4[0].conv2.trims[(2, 2)] is None


def test_a_vit_has_nothing_to_trim():
    model = open_clip.create_model("vlp-tiny-32")
    assert trim_dead_taps(model.visual) == 0
    assert type(model.visual.conv1) is torch.nn.Conv2d
