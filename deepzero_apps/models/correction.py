"""Solver-in-the-Loop correction network (Um et al. NeurIPS 2020).

A small fully convolutional ResNet (5x5 kernels, 32 filters) that maps a solver state to a
correction of the same spatial size; ``padding_mode="circular"`` suits periodic domains.
Input conv, every residual block and the output conv are separate stages for feature reuse.
Circular padding wraps by slices, so any grid works, including 1-D problems (``ny = 1``) where torch's
own circular padding refuses to wrap more than once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model


def wrap_pad(x: torch.Tensor, pad: int, axis: int) -> torch.Tensor:
    """Periodic padding of `axis` by `pad` cells on each side, wrapping as often as needed.

    Built from slices and one concatenation: under `vmap` (the stacked ZO-SOL queries) an index-based
    wrap becomes a gather, which cost more than the convolution it feeds.
    """
    n = x.shape[axis]
    if pad == 0:
        return x
    if pad > n:  # wrap more than once: whole copies first, then the remainder
        whole = -(-pad // n)
        x = torch.cat([x] * (2 * whole + 1), dim=axis)
        return x.narrow(axis, whole * n - pad, n + 2 * pad)
    return torch.cat([x.narrow(axis, n - pad, pad), x, x.narrow(axis, 0, pad)], dim=axis)


class WrapConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose circular padding wraps any number of times (periodic axes of any size)."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.padding_mode != "circular":
            return super()._conv_forward(input, weight, bias)
        input = wrap_pad(wrap_pad(input, self.padding[0], -2), self.padding[1], -1)
        return F.conv2d(input, weight, bias, self.stride, 0, self.dilation, self.groups)


class ResidualBlock(nn.Module):
    """x + conv(relu(conv(x))) with size-preserving padding."""

    def __init__(self, width: int, kernel_size: int, padding_mode: str) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.conv1 = WrapConv2d(width, width, kernel_size, padding=pad, padding_mode=padding_mode)
        self.conv2 = WrapConv2d(width, width, kernel_size, padding=pad, padding_mode=padding_mode)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.act(self.conv1(x)))


@register_model("correction_net")
def correction_net(
    in_channels: int,
    out_channels: int,
    width: int = 32,
    blocks: int = 2,
    kernel_size: int = 5,
    padding_mode: str = "zeros",
) -> nn.Sequential:
    """Input conv+ReLU, ``blocks`` residual blocks, output conv; spatial size is preserved."""
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd to preserve the spatial size, got {kernel_size}")
    pad = kernel_size // 2
    stem = nn.Sequential(
        WrapConv2d(in_channels, width, kernel_size, padding=pad, padding_mode=padding_mode), nn.ReLU()
    )
    body = [ResidualBlock(width, kernel_size, padding_mode) for _ in range(blocks)]
    out = WrapConv2d(width, out_channels, kernel_size, padding=pad, padding_mode=padding_mode)
    return nn.Sequential(stem, *body, out)
