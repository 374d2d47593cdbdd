"""Flow past a cylinder (a Karman vortex street) in PhiFlow: a black box and its differentiable twin.

Like Solver-in-the-Loop's karman setup, written with PhiFlow (``pip install 'deepzero-apps[phiflow]'``):
a ``Ly x Lx`` channel (default 100 x 200) with a cylinder of radius 10 at (50, 50), inflow ``u = 1`` in
the first column of cells, zero-gradient velocity on the other sides (pressure 0 there). One step of
``dt``: semi-Lagrangian advection, explicit diffusion with ``nu = U 2R / Re``, the inflow imposed, and a
pressure projection (``fluid.make_incompressible``, conjugate gradients, compact stencil) with the cylinder imposed by
penalisation (velocity zeroed in the cells it covers, by volume fraction). The Reynolds number is a
condition drawn per simulation (log-uniform in 100-1000 by default) and rides in PhiFlow's batch dimension, so
:meth:`PhiflowWakeSolver.step_batch` steps many simulations in one call.

The state is cell-centred, ``(2, ny, nx)`` = ``(u, v)``. The same code runs on PhiFlow's numpy backend
(the black box of ``src``/``non``/``zo_sol``) and on its torch backend (:meth:`torch_twin`, which
backpropagates through the pressure solve, for ``fo_sol``); both solve to ``tolerance`` in float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .base import require
from .burgers import smooth_random_field
from .cylinder import CylinderFlow

try:
    from phi import geom
    from phi import math as pm
    from phi.flow import Box, CenteredGrid, Solve, advect, diffuse, extrapolation, fluid, vec
except ImportError as exc:  # the optional extra is missing
    raise ImportError(
        "solver 'phiflow_wake' needs PhiFlow: pip install 'deepzero-apps[phiflow]' (phiflow>=3.4)"
    ) from exc

__all__ = ["PhiflowWakeSolver"]

PRESETS: dict[str, tuple[int, int]] = {"reference": (64, 128), "source": (16, 32)}
DIMS = ["b", "vector", "y", "x"]


class PhiflowWakeSolver(CylinderFlow):
    """Incompressible flow past a cylinder in PhiFlow; channels ``("u", "v")`` at cell centres.

    Parameters as :class:`CylinderFlow`'s (``"reference"`` is 128x64, ``"source"`` 32x16; the radius
    must be > 0), plus ``tolerance``, the relative and absolute tolerance of the pressure solve.
    """

    name = "phiflow_wake"
    presets = PRESETS
    staggered = False

    def __init__(
        self,
        resolution: int | str | Sequence[int] = "source",
        size: Sequence[float] = (100.0, 200.0),
        dt: float = 1.0,
        re: float = 200.0,
        inflow: float = 1.0,
        center: Sequence[float] = (50.0, 50.0),
        radius: float = 10.0,
        perturbation: float = 0.1,
        tolerance: float = 1e-10,
    ) -> None:  # spelled out: the registry reads the parameters from this signature
        require(radius > 0, f"radius={radius} must be > 0")
        require(0 < tolerance < 1e-3, f"tolerance={tolerance} must be in (0, 1e-3)")
        self.tolerance = float(tolerance)
        super().__init__(resolution, size, dt, re, inflow, center, radius, perturbation)

    # -- the PhiFlow step, backend-agnostic -------------------------------------------------------------
    def _simulate(self, native: Any, re: Any, steps: int = 1, project_only: bool = False) -> Any:
        """``steps`` steps of a native batch ``(B, 2, ny, nx)`` (numpy or torch) with Reynolds numbers ``(B,)``."""
        (ny, nx), (ly, lx) = self.grid.shape, self.grid.size
        with pm.precision(64), _backend_of(native):
            bounds = Box(x=lx, y=ly)
            values = pm.tensor(native, pm.batch("b"), pm.channel(vector="x,y"), pm.spatial("y,x"))
            zg = extrapolation.ZERO_GRADIENT  # velocity (and masks): open sides, pressure 0 beyond them
            v = CenteredGrid(values, zg, bounds=bounds)
            first_column = np.zeros((ny, nx))
            first_column[:, 0] = 1.0
            inflow = CenteredGrid(pm.tensor(first_column, pm.spatial("y,x")), zg, bounds=bounds)
            cylinder = geom.infinite_cylinder(x=self.center[0], y=self.center[1], radius=self.radius, inf_dim=None)
            fluid_cells = 1 - CenteredGrid(cylinder, zg, bounds=bounds, x=nx, y=ny)  # volume fraction
            solve = Solve("CG", self.tolerance, self.tolerance, max_iterations=20 * nx * ny)

            def project(v: CenteredGrid) -> CenteredGrid:
                # The cylinder is imposed by penalisation (velocity zeroed in it before and after the
                # projection), identically on both backends.
                # Compact stencil: symmetric, so CG solves it and its adjoint (the wide centred stencil
                # has checkerboard null modes that make the backward solve diverge).
                v, _ = fluid.make_incompressible(v * fluid_cells, (), solve, wide_stencil=False)
                return v * fluid_cells

            nu = self.inflow * 2.0 * self.radius / pm.tensor(re, pm.batch("b"))
            for _ in range(0 if project_only else steps):
                v = advect.semi_lagrangian(v, v, self.dt)
                v = diffuse.explicit(v, nu, self.dt)
                v = project(v * (1 - inflow) + inflow * vec(x=self.inflow, y=0.0))
            return (project(v) if project_only else v).values.native(DIMS)

    # -- Solver API ---------------------------------------------------------------------------------
    def initial_state(self, seed: int, **params: Any) -> np.ndarray:
        state = np.zeros(self.state_shape)
        state[0] = self.inflow
        state += smooth_random_field(self.grid, np.random.default_rng([int(seed), 0]), 2, self.perturbation, kmax=3)
        return np.asarray(self._simulate(state[None], np.array([self.re]), project_only=True)[0])

    def step(self, state: np.ndarray, forcing: np.ndarray | None = None, re: float | None = None, **params: Any) -> np.ndarray:
        return self.step_batch(np.asarray(state, dtype=np.float64)[None], re=[self.re if re is None else re])[0]

    def step_batch(self, states: np.ndarray, re: Sequence[float] | None = None, **params: Any) -> np.ndarray:
        """All simulations of the batch in one PhiFlow call (its batch dimension)."""
        states = np.asarray(states, dtype=np.float64)
        re = np.full(len(states), self.re) if re is None else np.asarray(re, dtype=np.float64).reshape(-1)
        return np.asarray(self._simulate(states, re), dtype=np.float64)

    def torch_twin(self):
        """The same step on PhiFlow's torch backend: ``twin(states (B, 2, ny, nx), re (B,))``, differentiable."""
        import torch
        from phiml.backend import set_global_default_backend
        from phiml.backend.torch import TORCH

        # Autograd runs PhiFlow's adjoint pressure solve after `twin` returns, outside any backend
        # context, so torch and float64 become process-wide defaults (numpy calls pick numpy explicitly).
        set_global_default_backend(TORCH)
        pm.set_global_precision(64)

        def twin(state: torch.Tensor, re: torch.Tensor | None = None) -> torch.Tensor:
            re = torch.full((state.shape[0],), self.re, dtype=torch.float64) if re is None else re
            return self._simulate(state.to(torch.float64), re.to(torch.float64).reshape(-1))

        return twin

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "tolerance": self.tolerance}


def _backend_of(native: Any):
    """PhiFlow's backend for ``native`` arrays, used as the default for everything the step creates."""
    if isinstance(native, np.ndarray):
        from phiml.backend import NUMPY

        return NUMPY
    from phiml.backend.torch import TORCH

    return TORCH
