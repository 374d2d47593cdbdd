"""Solver registry: built-ins, ``register_solver`` and Python entry points.

Lookup order for a name: solvers registered in this process with :func:`register_solver`, then the
built-ins, then entry points of the group ``"deepzero_apps.solvers"`` from installed distributions
(an entry point cannot silently shadow a built-in). :func:`create_solver` also accepts a dotted
import path (``"pkg.module:Class"`` or ``"pkg.module.Class"``) or a Hydra-style mapping with
``_target_``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

__all__ = ["ENTRY_POINT_GROUP", "create_solver", "get_solver_class", "list_solvers", "register_solver"]

ENTRY_POINT_GROUP = "deepzero_apps.solvers"

BUILTINS: dict[str, str] = {
    "burgers": "deepzero_apps.solvers.burgers:BurgersSolver",
    "wake": "deepzero_apps.solvers.wake:WakeSolver",
    "external": "deepzero_apps.solvers.external:ExternalSolver",
}

_REGISTRY: dict[str, Callable[..., Any]] = {}

F = TypeVar("F", bound=Callable[..., Any])


def register_solver(name: str, factory: Callable[..., Any] | None = None, *, overwrite: bool = False):
    """Register a solver class (or factory) under ``name``; usable as ``@register_solver("name")``."""

    def deco(obj: F) -> F:
        if not overwrite and name in _REGISTRY and _REGISTRY[name] is not obj:
            raise ValueError(f"solver {name!r} is already registered ({_describe(_REGISTRY[name])})")
        _REGISTRY[name] = obj
        return obj

    return deco(factory) if factory is not None else deco


def unregister_solver(name: str) -> None:
    """Remove a solver registered with :func:`register_solver` (no effect on built-ins/entry points)."""
    _REGISTRY.pop(name, None)


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    found: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        prev = found.get(ep.name)
        if prev is not None and prev.value != ep.value:
            warnings.warn(
                f"solver entry point {ep.name!r} is defined twice ({prev.value!r} and {ep.value!r}); using the first",
                stacklevel=3,
            )
            continue
        found.setdefault(ep.name, ep)
    return found


def list_solvers() -> list[str]:
    """Sorted names of all available solvers (registered, built-in and entry points)."""
    return sorted(set(_REGISTRY) | set(BUILTINS) | set(_entry_points()))


def _import_object(path: str) -> Any:
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"not an import path 'package.module:Class': {path!r}")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def get_solver_class(name: str) -> Callable[..., Any]:
    """The class (or factory) registered under ``name``; ``ValueError`` listing choices if unknown."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in BUILTINS:
        return _import_object(BUILTINS[name])
    eps = _entry_points()
    if name in eps:
        ep = eps[name]
        try:
            return ep.load()
        except Exception as exc:  # noqa: BLE001 - report any plug-in import failure uniformly
            dist = getattr(getattr(ep, "dist", None), "name", None) or "unknown distribution"
            raise ImportError(
                f"cannot load solver plug-in {name!r} = {ep.value!r} from {dist}: {type(exc).__name__}: {exc}"
            ) from exc
    if ":" in name or ("." in name and not name.startswith(".")):
        try:
            return _import_object(name)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ValueError(f"cannot import solver {name!r}: {exc}") from None
    raise ValueError(
        f"unknown solver {name!r}; choose one of {list_solvers()} or give 'package.module:Class'"
    )


def create_solver(name: str | Mapping[str, Any], **kwargs: Any):
    """Instantiate a solver by registry name, import path, or Hydra mapping with ``_target_``.

    ``create_solver("burgers", resolution="reference")``;
    ``create_solver({"_target_": "deepzero_apps.solvers.wake.WakeSolver", "resolution": 64})``;
    ``create_solver({"name": "wake", "resolution": "source"})`` (a config group with a ``name`` key).
    """
    if isinstance(name, Mapping):
        cfg = dict(name)
        cfg.update(kwargs)
        if "_target_" in cfg:
            from hydra.utils import instantiate

            return instantiate(cfg)
        if "name" not in cfg:
            raise ValueError("a solver config needs a 'name' or a '_target_' key")
        return create_solver(cfg.pop("name"), **cfg)
    factory = get_solver_class(name)
    return factory(**kwargs)


def _describe(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
