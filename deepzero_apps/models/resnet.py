"""CIFAR ResNet-20/32/44/56 (He et al. 2016, section 4.2) with option-A shortcuts.

Option A (strided identity + zero channel padding) keeps ResNet-20 at 269,722 parameters, the
size DeepZero trains. Stem, every BasicBlock and the head are separate stages for feature reuse.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model


class ShortcutA(nn.Module):
    """Parameter-free shortcut: subsample by 2 and zero-pad the new channels on both sides."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.pad_front = (out_channels - in_channels) // 2
        self.pad_back = out_channels - in_channels - self.pad_front

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad_front, self.pad_back))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        changes_shape = stride != 1 or in_channels != out_channels
        self.shortcut: nn.Module = ShortcutA(in_channels, out_channels) if changes_shape else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def resnet(depth: int, num_classes: int = 10, in_channels: int = 3) -> nn.Sequential:
    """CIFAR ResNet of ``depth`` = 6n + 2 layers: stem, 3 groups of n blocks (16/32/64), head."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
    n = (depth - 2) // 6
    stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
    blocks: list[nn.Module] = []
    width = 16
    for group, out_width in enumerate((16, 32, 64)):
        for i in range(n):
            stride = 2 if group > 0 and i == 0 else 1
            blocks.append(BasicBlock(width, out_width, stride))
            width = out_width
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))
    model = nn.Sequential(stem, *blocks, head)
    # Kaiming-normal weights for conv and linear layers, as in the common CIFAR implementation.
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(m.weight)
    return model


@register_model("resnet20")
def resnet20(num_classes: int = 10, in_channels: int = 3) -> nn.Sequential:
    """ResNet-20 (269,722 parameters for 10 classes)."""
    return resnet(20, num_classes, in_channels)


@register_model("resnet32")
def resnet32(num_classes: int = 10, in_channels: int = 3) -> nn.Sequential:
    """ResNet-32."""
    return resnet(32, num_classes, in_channels)


@register_model("resnet44")
def resnet44(num_classes: int = 10, in_channels: int = 3) -> nn.Sequential:
    """ResNet-44."""
    return resnet(44, num_classes, in_channels)


@register_model("resnet56")
def resnet56(num_classes: int = 10, in_channels: int = 3) -> nn.Sequential:
    """ResNet-56."""
    return resnet(56, num_classes, in_channels)
