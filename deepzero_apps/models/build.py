"""Build a model from its config node, filling the data-dependent sizes its factory asks for.

One rule for every task: a size (``in_channels``, ``num_classes``, ``channels`` ...) is passed only when
the factory's signature names it and the config does not set it.
"""

from __future__ import annotations

import inspect
from typing import Any

from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..errors import ConfigError, one_line
from .registry import get_factory


def build_model(node: DictConfig, what: str = "model", **sizes: Any) -> nn.Module:
    """Instantiate `node`'s `_target_` with the `sizes` its factory accepts; errors name `what`."""
    spec = OmegaConf.to_container(node, resolve=True)
    target = str(spec.get("_target_", ""))
    try:
        factory = get_factory(spec["name"]) if target.endswith("create_model") else get_object(target)
        params = inspect.signature(factory).parameters
        fill = {k: v for k, v in sizes.items() if k in params and k not in spec}
        return instantiate(node, **fill)
    except Exception as exc:  # unknown names, import errors, and the factory's own errors (wrapped by Hydra)
        raise ConfigError(f"{what}: {one_line(exc)}") from exc
