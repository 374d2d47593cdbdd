"""Solver protocol shared by the built-in PDE solvers and user plug-ins.

A solver is a deterministic, gradient-free time stepper on a fixed 2D grid. Its state is a float64
array of shape ``(C, ny, nx)`` whose channels are named by :attr:`Solver.channels`. The engine never
differentiates through :meth:`Solver.step`; the correction network is trained with zeroth-order
estimates, so a solver can be numpy/scipy code or an external executable.

Resolution is a constructor parameter, so the fine *reference* and the coarse *source* simulations
of Solver-in-the-Loop are two instances of the same class; :meth:`Solver.downsample` and
:meth:`Solver.upsample` move states between them.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from deepzero_apps.errors import RunError, one_line

_SOLVER_PACKAGE = "deepzero_apps.solvers"  # the package of the built-in solvers (source fingerprint)

__all__ = ["Grid", "Solver", "SolverError", "check_state", "block_mean", "block_repeat", "require"]

BOUNDARIES: tuple[str, ...] = ("periodic", "wake", "custom")


class SolverError(RunError):
    """A solver produced an invalid state or failed to run; the message is a single line."""


#: Largest advective Courant number ``dt * U / dx`` a built-in solver accepts: semi-Lagrangian steps stay
#: stable beyond 1, but a backtrace over more cells than this no longer resolves the flow.
MAX_COURANT = 4.0


def require(ok: bool, message: str) -> None:
    """A solver's parameter check: ``ValueError`` (a one-line config error in the CLI) unless ``ok``."""
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class Grid:
    """A uniform 2D grid.

    Attributes:
        shape: ``(ny, nx)`` number of cells (rows are ``y``, columns are ``x``).
        size: ``(Ly, Lx)`` physical extent of the domain.
        boundary: boundary kind: ``"periodic"`` (both axes), ``"wake"`` (inflow left, outflow right,
            free-slip walls top and bottom) or ``"custom"`` (defined by an external code).
        staggered: ``True`` when velocity channels live on cell faces (MAC layout, see
            :class:`~deepzero_apps.solvers.wake.WakeSolver`), ``False`` for cell centres.
    """

    shape: tuple[int, int]
    size: tuple[float, float] = (1.0, 1.0)
    boundary: str = "periodic"
    staggered: bool = False

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape)
        size = tuple(float(s) for s in self.size)
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"Grid.shape must be two positive ints (ny, nx), got {self.shape!r}")
        if len(size) != 2 or min(size) <= 0:
            raise ValueError(f"Grid.size must be two positive floats (Ly, Lx), got {self.size!r}")
        if self.boundary not in BOUNDARIES:
            raise ValueError(f"Grid.boundary must be one of {BOUNDARIES}, got {self.boundary!r}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "size", size)

    @property
    def ny(self) -> int:
        return self.shape[0]

    @property
    def nx(self) -> int:
        return self.shape[1]

    @property
    def spacing(self) -> tuple[float, float]:
        """``(dy, dx)``."""
        return self.size[0] / self.shape[0], self.size[1] / self.shape[1]

    @property
    def dy(self) -> float:
        return self.spacing[0]

    @property
    def dx(self) -> float:
        return self.spacing[1]

    def cell_centers(self) -> tuple[np.ndarray, np.ndarray]:
        """``(Y, X)`` coordinates of the cell centres, each of shape ``(ny, nx)``."""
        dy, dx = self.spacing
        y = (np.arange(self.ny) + 0.5) * dy
        x = (np.arange(self.nx) + 0.5) * dx
        return np.meshgrid(y, x, indexing="ij")

    def with_shape(self, shape: tuple[int, int]) -> Grid:
        return Grid(shape=shape, size=self.size, boundary=self.boundary, staggered=self.staggered)


def check_state(
    name: str,
    state: Any,
    expected_shape: Sequence[int] | None,
    step: int | str | None = None,
    what: str = "state",
) -> np.ndarray:
    """Validate a solver state and return it as a float64 array.

    Raises :class:`SolverError` with a one-line message naming the solver, the step and the problem
    for non-arrays, wrong shapes and NaN/inf values. ``step`` is the step index (or a label such as
    ``"initial_state"``); the engine calls this on every output of every solver.
    """
    where = f"solver {name!r}" + (f" step {step}" if step is not None else "")
    if np.iscomplexobj(state):  # a float cast would silently drop the imaginary part
        raise SolverError(f"{where}: {what} is complex ({np.asarray(state).dtype}); return real values")
    try:
        arr = np.asarray(state, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SolverError(one_line(f"{where}: {what} is not a float array ({exc})")) from None
    if expected_shape is not None and tuple(arr.shape) != tuple(int(s) for s in expected_shape):
        raise SolverError(
            f"{where}: {what} has shape {tuple(arr.shape)}, expected {tuple(int(s) for s in expected_shape)}"
        )
    finite = np.isfinite(arr)
    if not finite.all():
        bad = arr[~finite]
        n_nan = int(np.isnan(bad).sum())
        n_inf = int(bad.size - n_nan)
        first = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise SolverError(
            f"{where}: {what} contains non-finite values ({n_nan} NaN, {n_inf} inf of {arr.size}; first at index {first})"
        )
    return arr


def _ratio(fine: tuple[int, int], coarse: tuple[int, int]) -> tuple[int, int]:
    ry, rx = fine[0] // coarse[0], fine[1] // coarse[1]
    if ry < 1 or rx < 1 or ry * coarse[0] != fine[0] or rx * coarse[1] != fine[1]:
        raise ValueError(f"grid {fine} is not an integer refinement of grid {coarse}")
    return ry, rx


def block_mean(state: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Area-average the last two axes of ``state`` down to ``shape`` (integer ratios only)."""
    state = np.asarray(state, dtype=np.float64)
    ry, rx = _ratio(state.shape[-2:], tuple(shape))
    lead = state.shape[:-2]
    return state.reshape(*lead, shape[0], ry, shape[1], rx).mean(axis=(-3, -1))


def block_repeat(state: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Piecewise-constant prolongation of the last two axes to ``shape`` (mean preserving)."""
    state = np.asarray(state, dtype=np.float64)
    ry, rx = _ratio(tuple(shape), state.shape[-2:])
    return np.repeat(np.repeat(state, ry, axis=-2), rx, axis=-1)


class Solver(ABC):
    """Base class of every solver (built-in or plug-in).

    Subclasses set :attr:`grid`, :attr:`channels` and :attr:`dt` in ``__init__`` (keyword arguments
    only, so Hydra's ``_target_`` can build them) and implement :meth:`initial_state` and
    :meth:`step`. ``step`` must be a pure, deterministic function of its inputs.

    Per-simulation quantities that stay fixed during a rollout (a forcing field, a Reynolds number)
    are produced by :meth:`conditions` from the same seed as the initial state and passed to every
    :meth:`step` call as keyword arguments: ``solver.step(state, **solver.conditions(seed))``.

    The physical parameters a study varies between simulations (Burgers' ``nu``, the wake's ``re``)
    are *conditions*, declared in :attr:`condition_defaults`: the app draws their values per
    simulation from the train / validation / test condition sets of its config and passes them to
    :meth:`conditions` and every :meth:`step` as keywords (docs/solvers.md).
    """

    #: Registry name; used in error messages.
    name: str = "solver"
    #: True when :meth:`step_batch` steps the whole batch at once (array operations, one process
    #: call); the default loops over :meth:`step`. Batched ZO-SOL queries stack K x B states per call
    #: either way, so a solver that declares it gets one call per rollout step of all perturbations.
    batch_native: bool = False
    grid: Grid
    channels: tuple[str, ...]
    dt: float = 1.0
    #: Defaults of the config option ``solver=<name>`` over the constructor's own: ``"params"`` (both
    #: instances), ``"reference"`` and ``"source"`` (per instance, e.g. ``{"resolution": [64, 64]}``).
    defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    #: The parameters that are conditions, each with its default condition set (used for all three
    #: splits): a value, a list of values (or of ranges) cycled over a split's simulations, or a range
    #: ``{"range": [low, high], "scale": "linear" | "log"}`` drawn per simulation from its seed.
    #: A condition is a keyword of :meth:`conditions` and :meth:`step`, never a config ``params`` key.
    condition_defaults: ClassVar[Mapping[str, Any]] = {}

    # -- required API ---------------------------------------------------------------------------
    @abstractmethod
    def initial_state(self, seed: int, **params: Any) -> np.ndarray:
        """A deterministic initial state of shape ``(C, ny, nx)`` (float64) for ``seed``."""

    @abstractmethod
    def step(self, state: np.ndarray, forcing: np.ndarray | None = None, **params: Any) -> np.ndarray:
        """Advance ``state`` by one time step ``dt``; returns a new array, never modifies ``state``."""

    # -- optional API ---------------------------------------------------------------------------
    def conditions(self, seed: int, **params: Any) -> dict[str, Any]:
        """Per-simulation keyword arguments for :meth:`step` (forcing field, parameters); ``params``
        holds the simulation's drawn condition values, passed on to :meth:`step` unless overridden
        here (raise ``ValueError`` for a value the solver cannot run)."""
        return dict(params)

    @property
    def state_shape(self) -> tuple[int, int, int]:
        return (len(self.channels), *self.grid.shape)

    def check(self, state: Any, step: int | str | None = None, what: str = "state") -> np.ndarray:
        """:func:`check_state` against this solver's name and state shape."""
        return check_state(self.name, state, self.state_shape, step=step, what=what)

    def native_batch(self, owner: type[Solver]) -> bool:
        """Whether `owner`'s vectorized :meth:`step_batch` applies: not for a subclass that overrides
        :meth:`step` alone (it gets the loop over its own step)."""
        return type(self).step is owner.step and type(self).step_batch is owner.step_batch

    def step_batch(self, states: np.ndarray, **params: Any) -> np.ndarray:
        """Step a batch ``(B, C, ny, nx)``; array-valued ``params`` with a leading ``B`` axis are split.

        This default loops over :meth:`step`; solvers that set :attr:`batch_native` override it."""
        states = np.asarray(states, dtype=np.float64)
        out = np.empty_like(states)
        for b in range(states.shape[0]):
            kw = {k: _index_batched(v, b, states.shape[0]) for k, v in params.items()}
            out[b] = self.step(states[b], **kw)
        return out

    def rollout(self, state: np.ndarray, n_steps: int, check: bool = True, **params: Any) -> np.ndarray:
        """``n_steps`` steps from ``state``; returns the trajectory ``(n_steps + 1, C, ny, nx)``."""
        traj = [np.asarray(state, dtype=np.float64)]
        for i in range(n_steps):
            nxt = self.step(traj[-1], **params)
            traj.append(self.check(nxt, step=i + 1) if check else nxt)
        return np.stack(traj)

    def downsample(self, state: np.ndarray, target: Solver | Grid | tuple[int, int]) -> np.ndarray:
        """Area-average a state of this (fine) solver onto the grid of ``target`` (coarse)."""
        return block_mean(state, _target_shape(target))

    def upsample(self, state: np.ndarray, target: Solver | Grid | tuple[int, int]) -> np.ndarray:
        """Piecewise-constant prolongation of a state of this (coarse) solver onto ``target``'s grid."""
        return block_repeat(state, _target_shape(target))

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly summary (name, grid, channels, dt) for logs and result files."""
        g = self.grid
        return {
            "name": self.name,
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "shape": list(g.shape),
            "size": list(g.size),
            "spacing": list(g.spacing),
            "boundary": g.boundary,
            "staggered": g.staggered,
            "channels": list(self.channels),
            "dt": self.dt,
        }

    def fingerprint(self) -> dict[str, Any]:
        """The identity of this solver's code, part of the reference-cache key: its class, the version
        of the distribution providing it, and a hash of the source of the modules that define it (its
        class hierarchy and the same-package modules those import from). External codes add theirs."""
        cls = type(self)
        return {
            "class": f"{cls.__module__}.{cls.__qualname__}",
            "version": _distribution_version(cls.__module__),
            "source": _source_hash(cls),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.grid.shape}, size={self.grid.size}, dt={self.dt})"


def _distribution_version(module: str) -> str | None:
    import importlib.metadata as md

    dists = _distributions_by_top_level(tuple(sys.path)).get(module.partition(".")[0], [])
    for dist in dists:
        try:
            return f"{dist} {md.version(dist)}"
        except md.PackageNotFoundError:
            continue
    return None


@functools.cache
def _distributions_by_top_level(path: tuple[str, ...]) -> Mapping[str, list[str]]:
    """`importlib.metadata.packages_distributions()`, once per `sys.path`: it reads every installed
    distribution's file list (~0.3 s), and every solver fingerprint (each PDE run, twice) asks it."""
    import importlib.metadata as md

    return md.packages_distributions()


def _source_hash(cls: type) -> str:
    """sha256 over every source file of the packages that define ``cls`` and its bases, plus the
    same-top-level modules they import.

    A whole package, not only the modules it imports from: a plug-in's ``from .consts import SCALE``
    binds a number, which names no module, so only hashing every module file of the package sees an
    edit of ``consts.py``. A built-in's package is ``deepzero_apps.solvers`` (not all of
    ``deepzero_apps``, whose unrelated edits must not invalidate every cached reference)."""
    import hashlib
    import inspect

    files: dict[str, Path] = {}

    def add_module(name: str) -> None:
        with contextlib.suppress(TypeError):  # a built-in or namespace module has no source file
            path = inspect.getsourcefile(sys.modules[name])
            if path:
                files[name] = Path(path)

    for klass in cls.__mro__:
        mod = sys.modules.get(klass.__module__)
        if mod is None or klass.__module__ in ("builtins", "abc"):
            continue
        add_module(mod.__name__)
        top = mod.__name__.partition(".")[0]
        for value in vars(mod).values():
            used = getattr(value, "__module__", None) or getattr(value, "__name__", "")
            if isinstance(used, str) and used.partition(".")[0] == top and used in sys.modules:
                add_module(used)
        package = _SOLVER_PACKAGE if mod.__name__.startswith(_SOLVER_PACKAGE + ".") else top
        for root in getattr(sys.modules.get(package), "__path__", ()):
            for path in sorted(Path(root).rglob("*.py")):
                if "__pycache__" not in path.parts:
                    files[f"{package}:{path.relative_to(root).as_posix()}"] = path
    digest = hashlib.sha256()
    for name, path in sorted(files.items()):
        with contextlib.suppress(OSError):  # a module deleted since import: its absence is hashed
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _index_batched(value: Any, b: int, batch: int) -> Any:
    # Batched arrays: per-sample scalars (B,) or per-sample fields (B, C, ny, nx).
    if isinstance(value, np.ndarray) and value.ndim in (1, 4) and value.shape[0] == batch:
        return value[b]
    if isinstance(value, (list, tuple)) and len(value) == batch:
        return value[b]
    return value


def _target_shape(target: Solver | Grid | tuple[int, int] | Mapping) -> tuple[int, int]:
    if isinstance(target, Solver):
        return target.grid.shape
    if isinstance(target, Grid):
        return target.shape
    shape = tuple(int(s) for s in target)  # type: ignore[arg-type]
    if len(shape) != 2:
        raise ValueError(f"target must be a Solver, a Grid or (ny, nx), got {target!r}")
    return shape  # type: ignore[return-value]


def parse_resolution(
    resolution: int | str | Sequence[int], presets: Mapping[str, tuple[int, int]], aspect: float = 1.0
) -> tuple[int, int]:
    """``"reference"``/``"source"`` presets, an int ``n`` (``(round(n * aspect), n)`` is ``(ny, nx)``),
    or an explicit ``(ny, nx)``."""
    if isinstance(resolution, str):
        if resolution not in presets:
            raise ValueError(
                f"unknown resolution {resolution!r}; choose one of {sorted(presets)} or (ny, nx)"
            )
        return presets[resolution]
    if isinstance(resolution, (int, np.integer)):
        return (max(1, int(math.floor(int(resolution) * aspect + 0.5))), int(resolution))
    shape = tuple(int(s) for s in resolution)
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"resolution must be a preset name, an int or (ny, nx), got {resolution!r}")
    return shape  # type: ignore[return-value]
