"""Convolutions computed without the kernel taps that only ever read zero padding.

A CNN built for 224 px and fed 32 px images ends in feature maps of 2x2 and 1x1, where most of a padded 3x3
kernel reads padding: on a 1x1 map only the centre tap sees data. The result is the same with or without those
taps, but oneDNN's CPU backward of such convolutions is very slow (resnet10t at 32 px: the last 3x3 conv's
backward took a third of the image tower's time). ``trim_dead_taps`` makes each padded convolution find, for the
input size it is called with, the smallest window of taps that reads data for some output position, and compute
with that window of its weight (as a linear layer where the window covers the whole input and the output is one
pixel).

The parameters are not touched: the weight keeps its shape and names, so checkpoints, optimizers, DDP and
open_clip loading see the plain model, and the dead taps get the zero gradient they got before. Sizes where every
tap reads data take the plain convolution.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def live_window(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> tuple[int, int] | None:
    """First and last kernel tap (along one dimension) that reads an input position for some output, or None if
    the convolution cannot be trimmed with a symmetric, non-negative padding. Returns (0, kernel - 1) when nothing
    is dead."""
    outputs = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    live = [t for t in range(kernel)
            if any(0 <= o * stride - padding + t * dilation < size for o in range(outputs))]
    if not live:
        return None
    lo, hi = live[0], live[-1]
    new_padding = padding - lo * dilation  # >= 0 without dilation: tap `padding` reads position 0 for output 0
    new_kernel = hi - lo + 1
    if new_padding < 0 or (size + 2 * new_padding - dilation * (new_kernel - 1) - 1) // stride + 1 != outputs:
        return None  # the trimmed window would need negative or unequal padding on the two sides
    return lo, hi


Trim = tuple[tuple[slice, slice], tuple[int, int], bool]  # window of taps, padding, computed as a linear layer


class TrimmedConv2d(torch.nn.Conv2d):
    """A Conv2d (its class swapped in place by ``trim_dead_taps``) that skips the taps that read only padding at
    the input size it is called with (worked out on the first call at each size, then looked up)."""

    trims: dict[tuple[int, int], Trim | None]  # input size -> its trim, None where every tap reads data

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[-2:])
        if size not in self.trims:
            self.trims[size] = self.trim_for(size)
        trim = self.trims[size]
        if trim is None:
            return super().forward(x)
        window, padding, linear = trim
        weight = self.weight[:, :, window[0], window[1]]
        if linear:  # the window is the whole input and there is one output pixel: a matrix product
            return F.linear(x.flatten(1), weight.flatten(1), self.bias)[:, :, None, None]
        return F.conv2d(x, weight, self.bias, self.stride, padding, self.dilation, self.groups)

    def trim_for(self, size: tuple[int, int]) -> Trim | None:
        windows = [live_window(size[d], self.kernel_size[d], self.stride[d], self.padding[d], self.dilation[d])
                   for d in (0, 1)]
        if None in windows or all(w == (0, k - 1) for w, k in zip(windows, self.kernel_size)):
            return None
        padding = tuple(self.padding[d] - windows[d][0] * self.dilation[d] for d in (0, 1))
        outputs = [(size[d] + 2 * padding[d] - self.dilation[d] * (windows[d][1] - windows[d][0]) - 1)
                   // self.stride[d] + 1 for d in (0, 1)]
        linear = (outputs == [1, 1] and padding == (0, 0) and self.groups == 1 and self.dilation == (1, 1)
                  and all(hi - lo + 1 == s for (lo, hi), s in zip(windows, size)))
        return tuple(slice(lo, hi + 1) for lo, hi in windows), padding, linear


def trim_dead_taps(module: torch.nn.Module) -> int:
    """Make every zero-padded ``nn.Conv2d`` of ``module`` a :class:`TrimmedConv2d` (in place; subclasses of Conv2d,
    whose forward may differ, are left alone). Returns how many; 0 for a ViT, whose patch embedding reads no
    padding."""
    count = 0
    for conv in module.modules():
        if (type(conv) is torch.nn.Conv2d and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
                and any(conv.padding)):
            conv.__class__ = TrimmedConv2d
            conv.trims = {}
            count += 1
    return count


def trimmed_names(module: torch.nn.Module) -> list[str]:
    """The convolutions of ``module`` that skip taps at some input size they have been called with."""
    return [name for name, m in module.named_modules()
            if isinstance(m, TrimmedConv2d) and any(t is not None for t in m.trims.values())]
