"""Gradient estimators. Each one fills `p.grad` for the objective's parameters, so any
`torch.optim` optimizer and lr_scheduler steps on the result exactly as after `loss.backward()`.

All three share one call: `estimate(objective, batch, coords=None, step=0) -> base loss`, where
`coords` (global coordinate indices, see `CoordinateView`) restricts the estimate to a sparse set
(the gradient is zero elsewhere) and `step` is the global step index, which seeds any randomness so a
resumed run replays the same directions. CGE and RGE run every query in full float32 precision
(`full_precision`: no autocast, no TF32 or bf16 math), whatever the caller set.
"""

from __future__ import annotations

from typing import Literal

import torch

from .batchnorm import frozen_running_stats
from .evaluators import ReferenceEvaluator, make_evaluator
from .objective import Batch, Objective
from .precision import full_precision
from .zo_core import (
    Directions,
    Scheme,
    check_distribution,
    check_mu,
    check_resolution,
    check_scheme,
    difference,
)


class CGE:
    """Coordinate-wise gradient estimate (DeepZero's estimator).

    forward:  g_i = (f(theta + mu e_i) - f(theta)) / mu            (d + 1 queries)
    central:  g_i = (f(theta + mu e_i) - f(theta - mu e_i)) / 2 mu  (2d + 1 queries)
    The base query f(theta) is always run: it is the step's loss and fills the feature cache.
    """

    def __init__(self, mu: float = 5e-3, scheme: Scheme = "forward", evaluator: str | ReferenceEvaluator = "reuse"):
        self.mu = check_mu(mu)
        self.scheme = check_scheme(scheme)
        self.evaluator = make_evaluator(evaluator)

    def queries_per_step(self, n: int) -> int:
        """Queries of one step over `n` coordinates, known before it runs (budgets check it first)."""
        return (2 if self.scheme == "central" else 1) * n + 1

    def estimate(self, objective: Objective, batch: Batch, coords: torch.Tensor | None = None, step: int = 0) -> float:
        view = objective.coords
        todo = torch.arange(view.dim) if coords is None else coords
        ev = self.evaluator
        check_resolution(self.mu, ((b.name, b.param) for b in view.blocks))
        with torch.no_grad(), full_precision():
            f0, context = ev.base(objective, batch)
            f0 = float(f0)
            with frozen_running_stats(objective.module):
                plus = ev.coordinate_losses(objective, batch, context, todo, self.mu)
                low: torch.Tensor | float = f0
                if self.scheme == "central":
                    low = ev.coordinate_losses(objective, batch, context, todo, -self.mu)
                grad = difference(plus, low, self.mu, self.scheme)
        view.write_grad(grad, coords)
        return f0


class RGE:
    """Randomized gradient estimate over q random directions u_1..u_q in the (sparse) coordinate space.

        g = (phi / q) * sum_i [(f(theta + mu u_i) - f(theta)) / mu] u_i     (forward)
        g = (phi / q) * sum_i [(f(theta + mu u_i) - f(theta - mu u_i)) / 2 mu] u_i   (central)

    gaussian: u ~ N(0, I_d), phi = 1;  sphere: u uniform on the unit sphere, phi = d,
    with d the number of estimated coordinates; both make E[u u^T] phi = I, so g is unbiased for the
    gradient of the Gaussian / sphere-smoothed loss (directions and scaling: `zo_core.Directions`).

    q=None uses q = d directions (the paper's CGE-vs-RGE comparison at equal query counts).
    seed_replay=True stores no directions: direction i of step t is regenerated from its seed when
    the gradient is assembled (MeZO-style), so memory stays at inference plus one parameter copy,
    which is kept to restore the weights bit for bit after every query.
    The evaluator runs the direction queries; a `ShardedEvaluator` splits them over torchrun ranks.
    """

    def __init__(
        self,
        q: int | None = 192,
        mu: float = 5e-3,
        distribution: Literal["gaussian", "sphere"] = "gaussian",
        scheme: Scheme = "forward",
        seed_replay: bool = False,
        seed: int = 0,
        evaluator: str | ReferenceEvaluator = "reuse",
    ):
        if q is not None and q < 1:
            raise ValueError(f"q must be >= 1 or None (q = d), got {q}")
        self.q, self.mu = (None if q is None else int(q)), check_mu(mu)
        self.distribution, self.scheme = check_distribution(distribution), check_scheme(scheme)
        self.seed_replay, self.seed = seed_replay, int(seed)
        self.evaluator = make_evaluator(evaluator)

    def directions(self, step: int, d: int, like: torch.Tensor) -> Directions:
        """The directions of step `step` in a d-dimensional space, in `like`'s dtype and device."""
        return Directions(
            self.q or d, (d,), distribution=self.distribution, seed=self.seed, step=step,
            dtype=like.dtype, device=like.device, keep=not self.seed_replay,
        )  # fmt: skip

    def queries_per_step(self, n: int) -> int:
        """Queries of one step over `n` coordinates: one per direction (two if central) plus the base."""
        return (2 if self.scheme == "central" else 1) * (self.q or n) + 1

    def estimate(self, objective: Objective, batch: Batch, coords: torch.Tensor | None = None, step: int = 0) -> float:
        view, ev = objective.coords, self.evaluator
        dirs = self.directions(step, view.dim if coords is None else len(coords), view.blocks[0].param)
        check_resolution(self.mu, ((b.name, b.param) for b in view.blocks))
        with torch.no_grad(), full_precision():
            f0, context = ev.base(objective, batch)
            f0 = float(f0)
            with frozen_running_stats(objective.module):
                plus = ev.direction_losses(objective, batch, context, dirs, coords, self.mu)
                low: torch.Tensor | float = f0
                if self.scheme == "central":
                    low = ev.direction_losses(objective, batch, context, dirs, coords, -self.mu)
            grad = dirs.combine(difference(plus, low, self.mu, self.scheme))
        view.write_grad(grad, coords)
        return f0


class FirstOrder:
    """Backprop through the same objective: the white-box baseline, everything else identical."""

    def queries_per_step(self, n: int) -> int:
        """One forward (counted as one query) per step, whatever the coordinates."""
        return 1

    def estimate(self, objective: Objective, batch: Batch, coords: torch.Tensor | None = None, step: int = 0) -> float:
        params = [b.param for b in objective.coords.blocks]
        for p in params:
            p.grad = None
        with torch.enable_grad():
            loss = objective.loss(batch)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])
        objective.coords.write_grad(flat if coords is None else flat[coords.to(flat.device)], coords)
        return float(loss.detach())
