"""DnCNN denoiser (Zhang et al. 2017) as used by denoised smoothing (Salman et al. 2020).

Tensor-only stages: the noisy input ``x`` is carried through every stage as extra channels,
``cat([x, h])``, so the last stage can return the residual ``x - noise`` without side inputs.
Stage 0 maps ``x`` to ``cat([x, h])``; each middle stage maps ``cat([x, h])`` to
``cat([x, h'])``; the last stage maps ``cat([x, h])`` to ``x - conv(h)``.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_model


class DnCNNStage(nn.Module):
    """One DnCNN layer that forwards the carried image alongside its features."""

    def __init__(self, channels: int, layer: nn.Module, first: bool = False, last: bool = False) -> None:
        super().__init__()
        self.channels = channels
        self.layer = layer
        self.first = first
        self.last = last

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.first:
            x, h = z, z
        else:
            x, h = z[:, : self.channels], z[:, self.channels :]
        out = self.layer(h)
        if self.last:
            return x - out
        return torch.cat([x, out], dim=1)


@register_model("dncnn")
def dncnn(channels: int = 3, depth: int = 17, width: int = 64) -> nn.Sequential:
    """DnCNN with ``depth`` conv layers of ``width`` filters; returns the denoised image."""
    if depth < 2:
        raise ValueError(f"DnCNN depth must be >= 2, got {depth}")
    first = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1, bias=True), nn.ReLU())
    stages = [DnCNNStage(channels, first, first=True)]
    for _ in range(depth - 2):
        # BatchNorm settings and init follow the denoised-smoothing DnCNN.
        layer = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width, eps=1e-4, momentum=0.95),
            nn.ReLU(),
        )
        stages.append(DnCNNStage(channels, layer))
    stages.append(DnCNNStage(channels, nn.Conv2d(width, channels, 3, padding=1, bias=False), last=True))
    model = nn.Sequential(*stages)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.orthogonal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model
