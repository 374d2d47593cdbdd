"""The bundled models' composite blocks, taught to the engine's exact fast paths.

The engine knows nothing of these models: it offers `register_structure` (a block's forward as a
tree) and `register_channelwise` (a module acting on each channel alone), and this module, run when
the models package is imported, registers the bundled ones like any user model would.
"""

from __future__ import annotations

from torch import nn

from deepzero_apps.engine.fastpaths import (
    Leaf,
    Node,
    Residual,
    Seq,
    describe,
    register_channelwise,
    register_structure,
)

from .cnn import MaybeMaxPool2d
from .correction import ResidualBlock
from .residual_adapter import ResidualAdapter
from .resnet import BasicBlock


def _basic_block(block: BasicBlock) -> Node:
    main = Seq((Leaf(block.conv1), Leaf(block.bn1), Leaf(nn.ReLU()), Leaf(block.conv2), Leaf(block.bn2)))
    return Seq((Residual(main, describe(block.shortcut)), Leaf(nn.ReLU())))


def _residual_block(block: ResidualBlock) -> Node:
    return Residual(Seq((Leaf(block.conv1), Leaf(block.act), Leaf(block.conv2))), Seq(()))


def _residual_adapter(adapter: ResidualAdapter) -> Node:
    return Residual(Leaf(adapter.conv), Seq(()))


register_structure(BasicBlock, _basic_block)
register_structure(ResidualAdapter, _residual_adapter)
register_structure(ResidualBlock, _residual_block)
register_channelwise(MaybeMaxPool2d)
