"""The small CNN family of the DeepZero paper (730 to 12,610 parameters on CIFAR-10).

Each conv block is its own stage so that feature reuse only recomputes the blocks at and after
a perturbed parameter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model


class MaybeMaxPool2d(nn.MaxPool2d):
    """2x2 max pooling that is skipped when the input is already smaller than 2x2.

    Deep small CNNs on 8x8 digits would otherwise pool 8 -> 4 -> 2 -> 1 -> error; with this
    module a depth-5 net pools three times and keeps 1x1 maps for the remaining blocks.
    On 32x32 CIFAR images (depth <= 5) every block pools, as in the paper.
    Without autograd on CPU (every ZO query) the pool is the max of four strided views: the same
    values, about 8x faster than the NCHW max_pool2d kernel on one thread, which dominated each
    small-CNN query. With autograd max_pool2d is kept: it routes a tie's gradient to one input; and
    under torch.jit.script / trace too, so an exported model is one graph in either grad mode.
    """

    def __init__(self) -> None:
        super().__init__(kernel_size=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < 2:
            return x
        exporting = torch.jit.is_scripting() or torch.jit.is_tracing()  # one graph whatever the grad mode
        if not exporting and x.device.type == "cpu" and x.dim() == 4 and not torch.is_grad_enabled():
            h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
            return torch.maximum(
                torch.maximum(x[..., 0:h:2, 0:w:2], x[..., 0:h:2, 1:w:2]),
                torch.maximum(x[..., 1:h:2, 0:w:2], x[..., 1:h:2, 1:w:2]),
            )
        return F.max_pool2d(x, self.kernel_size, self.stride)  # not super().forward: TorchScript cannot call it


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """conv3x3 (padding 1, bias) + BatchNorm + ReLU + 2x2 max pool (skipped below 2x2)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
        MaybeMaxPool2d(),
    )


@register_model("small_cnn")
def small_cnn(depth: int, in_channels: int = 3, num_classes: int = 10, channels: int = 18) -> nn.Sequential:
    """``depth`` conv blocks of ``channels`` filters, then global average pool + Linear."""
    if depth < 1:
        raise ValueError(f"small_cnn depth must be >= 1, got {depth}")
    blocks = [conv_block(in_channels if i == 0 else channels, channels) for i in range(depth)]
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))
    return nn.Sequential(*blocks, head)
