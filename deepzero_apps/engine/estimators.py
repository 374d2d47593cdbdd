"""Gradient estimators. Each one fills `p.grad` for the objective's parameters, so any
`torch.optim` optimizer and lr_scheduler steps on the result exactly as after `loss.backward()`.

All three share one call: `estimate(objective, batch, coords=None, step=0) -> base loss`, where
`coords` (global coordinate indices, see `CoordinateView`) restricts the estimate to a sparse set
(the gradient is zero elsewhere) and `step` is the global step index, which seeds any randomness so a
resumed run replays the same directions.
"""

from __future__ import annotations

from typing import Literal

import torch

from .batchnorm import frozen_running_stats
from .distributed import all_reduce_sum, rank, share_query_counts, world_size
from .evaluators import ReferenceEvaluator, make_evaluator
from .objective import Batch, Objective

Scheme = Literal["forward", "central"]


def _check_mu(mu: float) -> float:
    if not mu > 0:
        raise ValueError(f"mu must be > 0, got {mu}")
    return float(mu)


def _check_scheme(scheme: str) -> str:
    if scheme not in ("forward", "central"):
        raise ValueError(f"unknown difference scheme '{scheme}'; choose forward or central")
    return scheme


class CGE:
    """Coordinate-wise gradient estimate (DeepZero's estimator).

    forward:  g_i = (f(theta + mu e_i) - f(theta)) / mu            (d + 1 queries)
    central:  g_i = (f(theta + mu e_i) - f(theta - mu e_i)) / 2 mu  (2d + 1 queries)
    The base query f(theta) is always run: it is the step's loss and fills the feature cache.
    """

    def __init__(self, mu: float = 5e-3, scheme: Scheme = "forward", evaluator: str | ReferenceEvaluator = "reuse"):
        self.mu = _check_mu(mu)
        self.scheme = _check_scheme(scheme)
        self.evaluator = make_evaluator(evaluator)

    def queries_per_step(self, n: int) -> int:
        """Queries of one step over `n` coordinates, known before it runs (budgets check it first)."""
        return (2 if self.scheme == "central" else 1) * n + 1

    def estimate(self, objective: Objective, batch: Batch, coords: torch.Tensor | None = None, step: int = 0) -> float:
        view = objective.coords
        todo = torch.arange(view.dim) if coords is None else coords
        ev = self.evaluator
        with torch.no_grad():
            f0, context = ev.base(objective, batch)
            f0 = float(f0)
            with frozen_running_stats(objective.module):
                plus = ev.coordinate_losses(objective, batch, context, todo, self.mu)
                if self.scheme == "central":
                    minus = ev.coordinate_losses(objective, batch, context, todo, -self.mu)
                    grad = (plus - minus) / (2 * self.mu)
                else:
                    grad = (plus - f0) / self.mu
        view.write_grad(grad, coords)
        return f0


class RGE:
    """Randomized gradient estimate over q random directions u_1..u_q in the (sparse) coordinate space.

        g = (phi / q) * sum_i [(f(theta + mu u_i) - f(theta)) / mu] u_i     (forward)
        g = (phi / q) * sum_i [(f(theta + mu u_i) - f(theta - mu u_i)) / 2 mu] u_i   (central)

    gaussian: u ~ N(0, I_d), phi = 1;  sphere: u uniform on the unit sphere, phi = d,
    with d the number of estimated coordinates; both make E[u u^T] phi = I, so g is unbiased for the
    gradient of the Gaussian / sphere-smoothed loss.

    q=None uses q = d directions (the paper's CGE-vs-RGE comparison at equal query counts).
    seed_replay=True stores no directions: direction i of step t is regenerated from its seed when
    the gradient is assembled (MeZO-style), so memory stays at inference plus one parameter copy,
    which is kept to restore the weights bit for bit after every query.
    Under torchrun the directions are split over the ranks (each regenerates the others' from their
    seeds), and the step is bit-identical to a single process.
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
        if distribution not in ("gaussian", "sphere"):
            raise ValueError(f"unknown RGE distribution '{distribution}'; choose gaussian or sphere")
        self.q, self.mu, self.distribution = (None if q is None else int(q)), _check_mu(mu), distribution
        self.scheme = _check_scheme(scheme)
        self.seed_replay, self.seed = seed_replay, int(seed)
        self.evaluator = make_evaluator(evaluator)

    def direction(self, step: int, i: int, d: int, like: torch.Tensor) -> torch.Tensor:
        """Direction i of step `step`: a pure function of (seed, step, i)."""
        g = torch.Generator(device=like.device).manual_seed((self.seed * 1_000_003 + step) * 65_537 + i)
        u = torch.randn(d, generator=g, dtype=like.dtype, device=like.device)
        return u / u.norm() if self.distribution == "sphere" else u

    def queries_per_step(self, n: int) -> int:
        """Queries of one step over `n` coordinates: one per direction (two if central) plus the base."""
        return (2 if self.scheme == "central" else 1) * (self.q or n) + 1

    def estimate(self, objective: Objective, batch: Batch, coords: torch.Tensor | None = None, step: int = 0) -> float:
        view, ev = objective.coords, self.evaluator
        theta0 = view.flatten()
        idx = None if coords is None else coords.to(theta0.device)
        d = view.dim if coords is None else len(coords)
        first_stage = int(view.stage_of(coords).min()) if coords is not None else min(b.stage for b in view.blocks)
        phi = d if self.distribution == "sphere" else 1.0
        q = self.q or d

        def loss_at(u: torch.Tensor, sign: float) -> float:
            theta = theta0.clone()
            if idx is None:
                theta.add_(u, alpha=sign * self.mu)
            else:
                theta[idx] += sign * self.mu * u
            view.assign(theta)
            return float(ev.query(objective, batch, context, first_stage))

        with torch.no_grad():
            f0, context = ev.base(objective, batch)
            f0 = float(f0)
            coefs = torch.zeros(q, dtype=torch.float64)
            stored: dict[int, torch.Tensor] = {}
            before = objective.counter.snapshot()
            with frozen_running_stats(objective.module):
                try:
                    for i in range(rank(), q, world_size()):  # under torchrun: every world-th direction
                        u = self.direction(step, i, d, theta0)
                        low = loss_at(u, -1.0) if self.scheme == "central" else f0
                        width = 2 * self.mu if self.scheme == "central" else self.mu
                        coefs[i] = (loss_at(u, 1.0) - low) / width
                        if not self.seed_replay:
                            stored[i] = u
                finally:
                    view.assign(theta0)
            if world_size() > 1:  # exact: every coefficient is one rank's value plus zeros
                coefs = all_reduce_sum(coefs)
                share_query_counts(objective.counter, before)
            grad = torch.zeros(d, dtype=torch.float64, device=theta0.device)
            for i, c in enumerate(coefs.tolist()):
                u = stored[i] if i in stored else self.direction(step, i, d, theta0)
                grad.add_(u.to(torch.float64), alpha=c)
            grad.mul_(phi / q)
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
