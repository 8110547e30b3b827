"""Convolutions computed without the kernel taps that only ever read zero padding.

A CNN built for 224 px and fed 32 px images ends in feature maps of 2x2 and 1x1, where most of a padded 3x3
kernel reads padding: on a 1x1 map only the centre tap sees data. The result is the same with or without those
taps, but oneDNN's CPU backward of such convolutions is very slow (resnet10t at 32 px: the last 3x3 conv's
backward took a third of the image tower's time). ``trim_dead_taps`` finds, for the input size the model is
built for, the smallest window of taps that reads data for some output position, and computes each such
convolution with that window of its weight, as a linear layer where the window covers the whole input and the
output is one pixel.

The parameters are not touched: the weight keeps its shape and names, so checkpoints, optimizers, DDP and
open_clip loading see the plain model, and the dead taps get the zero gradient they got before. Inputs of
another size take the plain convolution.
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


class TrimmedConv2d(torch.nn.Conv2d):
    """A Conv2d (its class swapped in place by ``trim_dead_taps``) that skips dead taps at known input sizes."""

    # input size -> (window of taps, padding, computed as a linear layer)
    trims: dict[tuple[int, int], tuple[tuple[slice, slice], tuple[int, int], bool]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trim = self.trims.get(tuple(x.shape[-2:]))
        if trim is None:
            return super().forward(x)
        window, padding, linear = trim
        weight = self.weight[:, :, window[0], window[1]]
        if linear:  # the window is the whole input and there is one output pixel: a matrix product
            return F.linear(x.flatten(1), weight.flatten(1), self.bias)[:, :, None, None]
        return F.conv2d(x, weight, self.bias, self.stride, padding, self.dilation, self.groups)


def trim_dead_taps(module: torch.nn.Module, image_sizes: int | list[int]) -> list[str]:
    """Trim every zero-padded Conv2d of ``module`` (an image tower) for square inputs of ``image_sizes`` pixels.

    The input size of each convolution is found with one forward pass of two blank images per size (eval mode,
    no gradient). Returns the names of the convolutions trimmed at some size."""
    sizes = [image_sizes] if isinstance(image_sizes, int) else list(image_sizes)
    convs = [m for m in module.modules() if type(m) in (torch.nn.Conv2d, TrimmedConv2d)
             and m.padding_mode == "zeros" and not isinstance(m.padding, str) and any(m.padding)]
    if not convs:  # e.g. a ViT: its patch embedding reads no padding
        return []
    seen: dict[torch.nn.Conv2d, set[tuple[int, int]]] = {m: set() for m in convs}

    def record(conv, args):
        seen[conv].add(tuple(args[0].shape[-2:]))

    hooks = [m.register_forward_pre_hook(record) for m in convs]
    param = next(module.parameters())
    was_training = module.training
    try:
        module.eval()
        with torch.no_grad():
            for size in sizes:
                module(torch.zeros(2, 3, size, size, device=param.device, dtype=param.dtype))
    finally:
        module.train(was_training)
        for h in hooks:
            h.remove()

    names = {m: name for name, m in module.named_modules()}
    trimmed = []
    for conv in convs:
        trims = dict(getattr(conv, "trims", {}))
        for size in seen[conv]:
            windows = [live_window(size[d], conv.kernel_size[d], conv.stride[d], conv.padding[d], conv.dilation[d])
                       for d in (0, 1)]
            if None in windows or all(w == (0, k - 1) for w, k in zip(windows, conv.kernel_size)):
                continue
            padding = tuple(conv.padding[d] - windows[d][0] * conv.dilation[d] for d in (0, 1))
            outputs = [(size[d] + 2 * padding[d] - conv.dilation[d] * (windows[d][1] - windows[d][0]) - 1)
                       // conv.stride[d] + 1 for d in (0, 1)]
            linear = (outputs == [1, 1] and padding == (0, 0) and conv.groups == 1 and conv.dilation == (1, 1)
                      and all(hi - lo + 1 == s for (lo, hi), s in zip(windows, size)))
            trims[size] = (tuple(slice(lo, hi + 1) for lo, hi in windows), padding, linear)
        if trims:
            conv.__class__ = TrimmedConv2d
            conv.trims = trims
            trimmed.append(names[conv])
    return trimmed
