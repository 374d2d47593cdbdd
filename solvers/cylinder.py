"""Flow past a cylinder in a channel: what the scipy solver (`wake`), its torch twin (`wake_torch`) and
the PhiFlow one (`phiflow_wake`) share, so they cannot drift apart: their parameters and checks, the
stability limit, the Reynolds-number condition and viscosity, the description that keys the reference
cache, and the staggered grid's geometry (fixed faces, pressure matrix) of `wake` and its twin."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from .base import MAX_COURANT, Grid, Solver, SolverError, parse_resolution, require


class CylinderFlow(Solver):
    """Incompressible flow past a cylinder; channels ``("u", "v")``. Subclasses set `presets` (the
    ``"reference"`` and ``"source"`` grids, ``(ny, nx)``) and whether the grid is `staggered`.

    Args:
        resolution: ``"reference"``, ``"source"``, an int ``nx`` (grid ``nx/2 x nx`` for the default
            aspect) or ``(ny, nx)``.
        size: ``(Ly, Lx)``.
        dt: time step.
        re: Reynolds number (``U_in * 2 R / nu``) when :meth:`step` gets none; the app sets it per
            simulation as the condition ``re`` (log-uniform in 100-1000 by default).
        inflow: inflow speed ``U_in``.
        center, radius: cylinder centre ``(x, y)`` and radius.
        perturbation: RMS of the smooth random initial perturbation that triggers shedding.
    """

    channels = ("u", "v")
    defaults = {"reference": {"resolution": "reference"}, "source": {"resolution": "source"}}
    condition_defaults = {"re": [{"range": [100.0, 1000.0], "scale": "log"}]}  # a list: overridable by a list
    presets: dict[str, tuple[int, int]]
    staggered: bool

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
    ) -> None:
        ly, lx = (float(s) for s in size)
        require(min(ly, lx) > 0 and dt > 0 and inflow > 0, f"size={size}, dt={dt}, inflow={inflow} must be > 0")
        require(re > 0, f"re={re} must be > 0")
        require(radius >= 0 and perturbation >= 0, f"radius={radius} and perturbation={perturbation} must be >= 0")
        shape = parse_resolution(resolution, self.presets, aspect=ly / lx)
        courant = dt * inflow * max(shape[0] / ly, shape[1] / lx)
        require(
            courant <= MAX_COURANT,
            f"dt={dt} is beyond the stability limit: Courant number dt * inflow / dx = {courant:.3g} > "
            f"{MAX_COURANT:g} on the {shape[0]}x{shape[1]} grid",
        )
        self.grid = Grid(shape=shape, size=(ly, lx), boundary="wake", staggered=self.staggered)
        self.dt, self.re, self.inflow = float(dt), float(re), float(inflow)
        self.center, self.radius = (float(center[0]), float(center[1])), float(radius)
        self.perturbation = float(perturbation)
        self._setup()

    def _setup(self) -> None:
        """What a solver builds once from the checked parameters (matrices, masks); nothing by default.

        A hook rather than an overridden ``__init__``: the solver registry reads the parameters (and
        the config `solver=NAME` gets) from the constructor's signature, which stays this one."""

    def conditions(self, seed: int, re: float | None = None, **params: Any) -> dict[str, Any]:
        """The Reynolds number ``re`` of the simulation (a condition; default: the constructor's)."""
        re = self.re if re is None else float(re)
        require(re > 0, f"condition re={re} must be > 0")
        return {"re": re}

    def nu(self, re: float | None = None) -> float:
        """Kinematic viscosity ``U_in * 2 R / Re`` (``U_in * 20 / Re`` without a cylinder)."""
        re = self.re if re is None else float(re)
        if not re > 0:
            raise SolverError(f"solver {self.name!r}: Reynolds number must be positive, got {re}")
        return viscosity(self.inflow, self.radius, re)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "re": self.re, "inflow": self.inflow,
                "center": list(self.center), "radius": self.radius, "perturbation": self.perturbation}


def viscosity(inflow: float, radius: float, re: Any) -> Any:
    """``U_in * 2 R / Re`` for one Reynolds number or an array of them (``U_in * 20 / Re`` for ``R = 0``)."""
    return inflow * 2.0 * radius / re if radius > 0 else inflow * 20.0 / re


class StaggeredGeometry:
    """The cylinder on a staggered (MAC) grid: solid cells, fixed faces (velocity 0: touching the
    obstacle, or the top wall) and the pressure matrix ``L_w`` of the projection, with
    ``(L_w p)_c = sum over open faces f of c of (p_nb - p_c) / h_f^2`` (``p = 0`` beyond the outflow).
    Stored layout as in :mod:`.wake`: ``u`` on right faces, ``v`` on top faces."""

    def __init__(self, grid: Grid, center: tuple[float, float], radius: float) -> None:
        yc, xc = grid.cell_centers()
        self.solid = (xc - center[0]) ** 2 + (yc - center[1]) ** 2 < radius**2
        fixed_u = self.solid.copy()
        fixed_u[:, :-1] |= self.solid[:, 1:]
        fixed_v = self.solid.copy()
        fixed_v[:-1, :] |= self.solid[1:, :]
        fixed_v[-1, :] = True  # top wall
        self.fixed = np.stack([fixed_u, fixed_v])
        self.open = ~self.fixed
        self.matrix = self._pressure_matrix(grid)

    def _pressure_matrix(self, grid: Grid) -> sp.csr_matrix:
        ny, nx = grid.shape
        dy, dx = grid.spacing
        idx = np.arange(ny * nx).reshape(ny, nx)
        open_u, open_v = self.open
        rows, cols, vals = [], [], []
        diag = np.zeros((ny, nx))

        def couple(a: np.ndarray, b: np.ndarray, w: float) -> None:
            rows.extend([a, b])
            cols.extend([b, a])
            vals.extend([np.full(a.size, w), np.full(a.size, w)])

        # Interior x-faces: u[:, i] for i < nx - 1 joins cells i and i + 1.
        m = open_u[:, :-1]
        couple(idx[:, :-1][m], idx[:, 1:][m], 1.0 / dx**2)
        diag[:, :-1] -= m / dx**2
        diag[:, 1:] -= m / dx**2
        # Outflow faces: ghost pressure 0.
        diag[:, -1] -= open_u[:, -1] / dx**2
        # Interior y-faces: v[j, :] for j < ny - 1 joins cells j and j + 1 (v[ny - 1] is the wall).
        m = open_v[:-1, :]
        couple(idx[:-1, :][m], idx[1:, :][m], 1.0 / dy**2)
        diag[:-1, :] -= m / dy**2
        diag[1:, :] -= m / dy**2
        # Cells without any open face (inside the obstacle): p = 0.
        isolated = diag == 0.0
        diag[isolated] = 1.0
        rows.append(idx.ravel())
        cols.append(idx.ravel())
        vals.append(diag.ravel())
        n = ny * nx
        return sp.coo_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)
        ).tocsr()
