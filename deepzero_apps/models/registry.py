"""Name -> factory registry for the bundled models (timm style).

Configs and the CLI refer to models by name; the registry keeps that mapping in one place and
checks the one property the ZO engine relies on: a model is an ``nn.Sequential`` of stages.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

Factory = TypeVar("Factory", bound=Callable[..., nn.Sequential])

_REGISTRY: dict[str, Callable[..., nn.Sequential]] = {}


def register_model(name: str) -> Callable[[Factory], Factory]:
    """Decorator registering a model factory under ``name`` (names are unique)."""

    def decorator(factory: Factory) -> Factory:
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorator


def list_models() -> list[str]:
    """Sorted names of all registered models."""
    return sorted(_REGISTRY)


def get_factory(name: str) -> Callable[..., nn.Sequential]:
    """The factory registered as ``name`` (callers inspect its signature to fill data-dependent sizes)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model '{name}'; choose from: {', '.join(list_models())}") from None


def create_model(name: str, **kwargs) -> nn.Sequential:
    """Build the registered model ``name`` with the factory's keyword arguments."""
    model = get_factory(name)(**kwargs)
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"model factory '{name}' returned {type(model).__name__}, not an nn.Sequential")
    return model
