"""Black-box PDE solvers for Solver-in-the-Loop error correction, and their plug-in layer.

A coarse *source* simulation is corrected by a neural network after every solver step and trained to
follow a downsampled fine *reference* simulation. The solvers are numpy/scipy code or external
programs without autograd, so the network is trained with zeroth-order estimates (DeepZero).

Built-ins (``list_solvers()`` also shows plug-ins):

* ``burgers`` -- :class:`~.burgers.BurgersSolver`, 2D forced viscous Burgers, periodic
  (``burgers_torch.BurgersTorch`` is its differentiable twin for the first-order upper bound);
* ``wake`` -- :class:`~.wake.WakeSolver`, incompressible flow past a cylinder (staggered grid;
  ``wake_torch.WakeTorch`` is its differentiable twin);
* ``phiflow_wake`` -- :class:`~.phiflow_wake.PhiflowWakeSolver`, the same problem in PhiFlow (optional
  extra ``[phiflow]``), whose torch backend is its differentiable twin;
* ``external`` -- :class:`~.external.ExternalSolver`, any executable exchanging ``.npy`` files.

Writing a solver
----------------
Subclass :class:`Solver` with a keyword-only-friendly constructor (so Hydra can build it)::

    import numpy as np
    from deepzero_apps.solvers import Grid, Solver

    class HeatSolver(Solver):
        name = "heat"
        channels = ("T",)

        def __init__(self, resolution: int = 32, kappa: float = 0.1, dt: float = 0.1):
            self.grid = Grid(shape=(resolution, resolution), size=(1.0, 1.0), boundary="periodic")
            self.kappa, self.dt = kappa, dt

        def initial_state(self, seed: int, **params) -> np.ndarray:      # (C, ny, nx) float64
            return np.random.default_rng(seed).normal(size=self.state_shape)

        def step(self, state, forcing=None, **params) -> np.ndarray:   # pure and deterministic
            lap = sum(np.roll(state, s, a) for s in (1, -1) for a in (1, 2)) - 4 * state
            return state + self.dt * self.kappa * lap / self.grid.dx**2

Per-simulation data that stays fixed during a rollout (forcing fields, Reynolds numbers) comes from
``conditions(seed)`` and is passed to every ``step(state, **conditions)``. ``downsample``/``upsample``
move states between resolutions (area averaging by default; override for staggered data), and the
engine validates every output with :func:`check_state` (``SolverError`` on NaN/inf or wrong shape).

Registering it
--------------
In-process: decorate the class with ``@register_solver("heat")``. As an installable plug-in, add an
entry point to your package's ``pyproject.toml``::

    [project.entry-points."deepzero_apps.solvers"]
    heat = "my_package.heat:HeatSolver"

Either way ``deepzero-task pde solver=heat`` selects it with the defaults its class declares
(``Solver.defaults`` over the constructor's signature). From Python, ``create_solver("heat",
resolution=64)``, ``create_solver("my_package.heat:HeatSolver", ...)`` or a Hydra mapping
``create_solver({"_target_": "my_package.heat.HeatSolver", "resolution": 64})`` (equivalently
``hydra.utils.instantiate``). External programs: :class:`~.external.ExternalSolver`.
docs/solvers.md has the whole guide (config layout, the external-program contract, the cache).
"""

from __future__ import annotations

from typing import Any

from .base import Grid, Solver, SolverError, block_mean, block_repeat, check_state, require
from .registry import (
    ENTRY_POINT_GROUP,
    check_solver_config,
    create_solver,
    get_solver_class,
    list_solvers,
    register_solver,
    register_solver_configs,
    solver_config,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "BurgersSolver",
    "BurgersTorch",
    "ExternalSolver",
    "Grid",
    "Solver",
    "SolverError",
    "WakeSolver",
    "block_mean",
    "block_repeat",
    "check_solver_config",
    "check_state",
    "create_solver",
    "get_solver_class",
    "list_solvers",
    "register_solver",
    "register_solver_configs",
    "require",
    "solver_config",
]

_LAZY = {
    "BurgersSolver": ".burgers",
    "WakeSolver": ".wake",
    "ExternalSolver": ".external",
    "BurgersTorch": ".burgers_torch",  # imports torch only when used
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
