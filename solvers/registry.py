"""Solver registry: built-ins, ``register_solver`` and Python entry points.

Lookup order for a name: solvers registered in this process with :func:`register_solver`, then the
built-ins, then entry points of the group ``"deepzero_apps.solvers"`` from installed distributions
(an entry point cannot silently shadow a built-in). :func:`create_solver` also accepts a dotted
import path (``"pkg.module:Class"`` or ``"pkg.module.Class"``) or a Hydra-style mapping with
``_target_``.

Every solver also becomes a Hydra config option ``solver=<name>`` (group ``solver`` of Hydra's
ConfigStore, :func:`register_solver_configs`) whose defaults come from the class itself: its
:attr:`~.base.Solver.defaults` over its constructor's signature. A plug-in thus needs no YAML and never
inherits another solver's parameters.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

__all__ = [
    "ENTRY_POINT_GROUP",
    "check_solver_config",
    "create_solver",
    "get_solver_class",
    "list_solvers",
    "register_solver",
    "register_solver_configs",
    "solver_config",
]

ENTRY_POINT_GROUP = "deepzero_apps.solvers"

BUILTINS: dict[str, str] = {
    "burgers": "deepzero_apps.solvers.burgers:BurgersSolver",
    "wake": "deepzero_apps.solvers.wake:WakeSolver",
    "external": "deepzero_apps.solvers.external:ExternalSolver",
    "phiflow_wake": "deepzero_apps.solvers.phiflow_wake:PhiflowWakeSolver",  # needs the [phiflow] extra
}

_REGISTRY: dict[str, Callable[..., Any]] = {}

F = TypeVar("F", bound=Callable[..., Any])


def register_solver(name: str, factory: Callable[..., Any] | None = None, *, overwrite: bool = False):
    """Register a solver class (or factory) under ``name``; usable as ``@register_solver("name")``."""

    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", str(name)):  # it becomes the config option solver=<name>
        raise ValueError(f"solver name {name!r} must be letters, digits, '_', '.' or '-' (it is a config option name)")

    def deco(obj: F) -> F:
        if not overwrite and name in _REGISTRY and _REGISTRY[name] is not obj:
            raise ValueError(f"solver {name!r} is already registered ({_describe(_REGISTRY[name])})")
        _REGISTRY[name] = obj
        _store_config(name)
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


def create_solver(name: str | Mapping[str, Any], /, **kwargs: Any):
    """Instantiate a solver by registry name, import path, or Hydra mapping with ``_target_``.

    ``create_solver("burgers", resolution="reference")``;
    ``create_solver({"_target_": "deepzero_apps.solvers.wake.WakeSolver", "resolution": 64})``;
    ``create_solver({"name": "wake", "resolution": "source"})`` (a config group with a ``name`` key).
    ``name`` is positional-only, so a solver's own ``name`` argument (``ExternalSolver``) passes through.
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


# ---- configs: `solver=<name>` with the class's own defaults ------------------------------------------
ROLES = ("params", "reference", "source")
CONDITION_SPLITS = ("train", "validation", "test")


def _plain(value: Any) -> Any:
    """A default as an OmegaConf value (tuples become lists); ``None`` when it has no config form."""
    if isinstance(value, (tuple, list)):
        items = [_plain(v) for v in value]
        return None if any(i is None and v is not None for i, v in zip(items, value)) else items
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value if value is None or isinstance(value, (bool, int, float, str)) else None


def _signature(factory: Callable[..., Any]) -> tuple[dict[str, inspect.Parameter], bool]:
    """Keyword parameters of ``factory`` and whether it also takes ``**kwargs``."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return {}, True
    named = {
        n: p
        for n, p in sig.parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    return named, any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())


def solver_config(name: str) -> dict[str, Any]:
    """The config node of ``solver=<name>``: ``{"name", "params", "reference", "source", "conditions"}``.

    ``params`` lists every constructor argument (``"???"`` when required, so it must be set) with the
    class's declared ``defaults["params"]`` on top; ``reference``/``source`` are the per-instance
    arguments of ``defaults`` (typically ``resolution``), which are then left out of ``params``, as
    are the solver's conditions: ``conditions`` holds their train / validation / test sets, each
    starting from the class's ``condition_defaults``.
    """
    factory = get_solver_class(name)
    declared = getattr(factory, "defaults", None) or {}
    conditions = dict(getattr(factory, "condition_defaults", None) or {})
    per_role = {role: dict(declared.get(role, {})) for role in ("reference", "source")}
    named, _ = _signature(factory)
    params: dict[str, Any] = {}
    for key, p in named.items():
        if key in per_role["reference"] or key in per_role["source"] or key in conditions:
            continue
        if p.default is inspect.Parameter.empty:
            params[key] = "???"
        elif (value := _plain(p.default)) is not None or p.default is None:
            params[key] = value
    params.update(declared.get("params", {}))
    sets = {split: _plain(conditions) for split in CONDITION_SPLITS}
    return {"name": name, "params": _plain(params), **{r: _plain(v) for r, v in per_role.items()}, "conditions": sets}


def check_solver_config(name: str, sections: Mapping[str, Mapping[str, Any]]) -> None:
    """``ValueError`` naming an argument the solver's constructor does not take, with the accepted ones."""
    factory = get_solver_class(name)
    named, open_kwargs = _signature(factory)
    conditions = getattr(factory, "condition_defaults", None) or {}
    for role in ROLES:
        for key in sections.get(role) or {}:
            if key in conditions:
                raise ValueError(
                    f"solver.{role}.{key}: '{key}' is a condition of solver '{name}', set per split: "
                    f"solver.conditions.train.{key}=..., solver.conditions.validation.{key}=..., "
                    f"solver.conditions.test.{key}=... (docs/solvers.md)"
                )
            if key not in named and not open_kwargs:
                how = ("select a solver with solver=NAME to get its own defaults" if name in list_solvers() else
                       f"an unregistered class brings no defaults: write a solver config file with name: {name} "
                       "and its params, reference and source (docs/solvers.md)")
                raise ValueError(
                    f"solver.{role}.{key}: solver '{name}' has no parameter '{key}'; accepted: {', '.join(named)} ({how})"
                )


def _store_config(name: str) -> None:
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    try:
        spec = solver_config(name)
    except Exception:  # noqa: BLE001 - a broken plug-in is reported when selected, not at start-up
        spec = {"name": name, "params": {}, "reference": {}, "source": {}}
    spec.setdefault("conditions", {split: {} for split in CONDITION_SPLITS})
    node = OmegaConf.create(spec)
    for role in ROLES:  # open dicts: `solver.params.KEY=VALUE` needs no `+`; unknown keys are
        OmegaConf.set_struct(node[role], False)  # reported by check_solver_config with the accepted ones
    for split in CONDITION_SPLITS:  # likewise unknown conditions (tasks/pde/conditions.py)
        OmegaConf.set_struct(node.conditions[split], False)
    ConfigStore.instance().store(group="solver", name=name, node=node, provider="deepzero_apps.solvers")


def register_solver_configs() -> None:
    """Store ``solver=<name>`` for every solver :func:`list_solvers` knows (called at config set-up)."""
    for name in list_solvers():
        _store_config(name)
