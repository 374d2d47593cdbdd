"""A tiny third-party solver plug-in used by tests/test_solver_plugins.py.

It is made discoverable through a real ``*.dist-info/entry_points.txt`` written by the test into a
temporary directory on ``sys.path`` (group ``deepzero_apps.solvers``, name ``demo_decay``).
"""

from __future__ import annotations

import numpy as np

from deepzero_apps.solvers import Grid, Solver


class DecaySolver(Solver):
    """``q <- q * (1 - rate * dt)`` on a periodic square: trivially checkable dynamics."""

    name = "demo_decay"
    channels = ("q",)

    def __init__(self, resolution: int = 8, rate: float = 0.5, dt: float = 0.1) -> None:
        self.grid = Grid(shape=(resolution, resolution), size=(1.0, 1.0), boundary="periodic")
        self.rate = float(rate)
        self.dt = float(dt)

    def initial_state(self, seed: int, **params) -> np.ndarray:
        return np.random.default_rng(seed).normal(size=self.state_shape)

    def step(self, state, forcing=None, **params) -> np.ndarray:
        out = np.asarray(state, dtype=np.float64) * (1.0 - self.rate * self.dt)
        return out if forcing is None else out + self.dt * np.asarray(forcing)
