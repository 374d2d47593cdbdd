"""A 1-D viscous Burgers solver as a deepzero-apps plug-in (walked through in docs/solvers.md)."""

from __future__ import annotations

import numpy as np

from deepzero_apps.solvers import Grid, Solver


class Burgers1D(Solver):
    """``u_t + u u_x = nu u_xx`` on a periodic line: explicit upwind advection, central diffusion."""

    name = "burgers1d"
    channels = ("u",)
    # What `solver=burgers1d` starts from: a 4x finer reference than the corrected source.
    defaults = {"reference": {"resolution": 128}, "source": {"resolution": 32}}

    def __init__(self, resolution: int = 32, length: float = 2 * np.pi, nu: float = 0.01, dt: float = 0.02):
        if nu <= 0 or dt <= 0:
            raise ValueError(f"nu={nu} and dt={dt} must be > 0")
        self.grid = Grid(shape=(1, resolution), size=(1.0, length), boundary="periodic")
        self.nu, self.dt = float(nu), float(dt)
        limit = min(self.grid.dx / 1.5, self.grid.dx**2 / (2 * self.nu))  # |u| <= 1.5 by construction
        if self.dt > limit:
            raise ValueError(f"dt={dt} exceeds the explicit stability limit {limit:.4g} at {resolution} cells")

    def initial_state(self, seed: int, **params) -> np.ndarray:
        rng = np.random.default_rng(seed)
        x = np.arange(self.grid.nx) * self.grid.dx
        k, a, phase = np.arange(1, 4), rng.uniform(-0.5, 0.5, 3), rng.uniform(0, 2 * np.pi, 3)
        return np.sin(np.outer(x, k) + phase) @ a * np.ones(self.state_shape)

    def step(self, state: np.ndarray, forcing=None, **params) -> np.ndarray:
        u, dx = state[0, 0], self.grid.dx
        up, um = np.roll(u, -1), np.roll(u, 1)
        advection = u * np.where(u > 0, u - um, up - u) / dx
        diffusion = self.nu * (up - 2 * u + um) / dx**2
        return (u + self.dt * (diffusion - advection)).reshape(self.state_shape)
