"""Flow past a cylinder in a channel: what the scipy solver (`wake`) and the PhiFlow one
(`phiflow_wake`) share, so the two cannot drift apart: their parameters and checks, the stability
limit, the per-simulation Reynolds number and the description that keys the reference cache."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .base import MAX_COURANT, Grid, Solver, parse_resolution, require


class CylinderFlow(Solver):
    """Incompressible flow past a cylinder; channels ``("u", "v")``. Subclasses set `presets` (the
    ``"reference"`` and ``"source"`` grids, ``(ny, nx)``) and whether the grid is `staggered`.

    Args:
        resolution: ``"reference"``, ``"source"``, an int ``nx`` (grid ``nx/2 x nx`` for the default
            aspect) or ``(ny, nx)``.
        size: ``(Ly, Lx)``.
        dt: time step.
        re: Reynolds number (``U_in * 2 R / nu``) when :meth:`step` gets none.
        re_range: ``(low, high)`` range of the per-simulation Reynolds number (log-uniform).
        inflow: inflow speed ``U_in``.
        center, radius: cylinder centre ``(x, y)`` and radius.
        perturbation: RMS of the smooth random initial perturbation that triggers shedding.
    """

    channels = ("u", "v")
    defaults = {"reference": {"resolution": "reference"}, "source": {"resolution": "source"}}
    presets: dict[str, tuple[int, int]]
    staggered: bool

    def __init__(
        self,
        resolution: int | str | Sequence[int] = "source",
        size: Sequence[float] = (100.0, 200.0),
        dt: float = 1.0,
        re: float = 200.0,
        re_range: Sequence[float] = (100.0, 1000.0),
        inflow: float = 1.0,
        center: Sequence[float] = (50.0, 50.0),
        radius: float = 10.0,
        perturbation: float = 0.1,
    ) -> None:
        ly, lx = (float(s) for s in size)
        require(min(ly, lx) > 0 and dt > 0 and inflow > 0, f"size={size}, dt={dt}, inflow={inflow} must be > 0")
        require(re > 0 and 0 < re_range[0] <= re_range[1], f"re={re}, re_range={re_range} must be positive, low <= high")
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
        self.re_range = (float(re_range[0]), float(re_range[1]))
        self.center, self.radius = (float(center[0]), float(center[1])), float(radius)
        self.perturbation = float(perturbation)
        self._setup()

    def _setup(self) -> None:
        """What a solver builds once from the checked parameters (matrices, masks); nothing by default.

        A hook rather than an overridden ``__init__``: the solver registry reads the parameters (and
        the config `solver=NAME` gets) from the constructor's signature, which stays this one."""

    def reynolds(self, seed: int) -> float:
        """The Reynolds number of simulation ``seed`` (log-uniform in ``re_range``)."""
        lo, hi = self.re_range
        u = np.random.default_rng([int(seed), 2]).uniform()
        return float(math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))))

    def conditions(self, seed: int, **params: Any) -> dict[str, Any]:
        re = params.get("re")
        return {"re": float(re) if re is not None else self.reynolds(seed)}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "re": self.re, "re_range": list(self.re_range), "inflow": self.inflow,
                "center": list(self.center), "radius": self.radius, "perturbation": self.perturbation}
