"""A residual k x k convolution initialised to the identity: a small module added after a frozen model.

Fine-tuning only this adapter estimates k*k*C*C + C coordinates (12 on RGB with k = 1) instead of the
whole model's, so a zeroth-order step costs a few queries; its zero-initialised conv makes the
adapted model start exactly where the frozen one is.
"""

from __future__ import annotations

import torch
from torch import nn


class ResidualAdapter(nn.Module):
    """``y + conv(y)`` with the conv's weight and bias zero, so it starts as the identity."""

    def __init__(self, channels: int, kernel_size: int = 1) -> None:
        super().__init__()
        if channels < 1 or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"adapter needs channels >= 1 and an odd kernel_size, got {channels} and {kernel_size}")
        self.conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.conv(y)
