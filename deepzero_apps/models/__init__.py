"""Bundled models: each is an ``nn.Sequential`` whose top-level children are the ZO engine's stages.

Importing this package registers every model with :func:`create_model`, and their composite blocks
with the engine's fast paths (`structures`).
"""

from . import structures  # noqa: F401  (registers the blocks with the engine's fast paths)
from .cnn import small_cnn
from .correction import correction_net
from .dncnn import dncnn
from .mlp import mlp
from .registry import create_model, get_factory, list_models, register_model
from .residual_adapter import ResidualAdapter
from .resnet import resnet, resnet20, resnet32, resnet44, resnet56

__all__ = [
    "correction_net",
    "create_model",
    "dncnn",
    "get_factory",
    "list_models",
    "mlp",
    "ResidualAdapter",
    "register_model",
    "resnet",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "small_cnn",
]
