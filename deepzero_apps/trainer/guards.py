"""What a step must pass before it counts: finite loss, gradients and updated state, and a query cost
known in advance so the budget is checked before anything is spent."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..engine import Objective
from ..engine.queries import QueryCounter
from ..errors import RunError


class NonFiniteError(RunError):
    """A step produced a NaN/inf loss, gradient or update (the run stops; the last checkpoint stays good)."""


def grads_finite(objective: Objective, loss: float) -> bool:
    """The loss and every estimated gradient are finite."""
    return math.isfinite(loss) and all(
        torch.isfinite(b.param.grad).all() for b in objective.coords.blocks if b.param.grad is not None
    )


def state_finite(module: nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    """Parameters, buffers and optimizer state after a step: all finite (what a checkpoint would save)."""
    tensors = list(module.state_dict().values())
    tensors += [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return all(torch.isfinite(t).all() for t in tensors if t.is_floating_point() or t.is_complex())


def step_cost(estimator: Any, objective: Objective, coords: torch.Tensor | None, batch: Any, last: int) -> int:
    """Queries the next step will spend, known before it runs: the estimator's count (CGE, RGE, first
    order), converted by the counter when it counts another unit (`step_cost(loss_queries, batch)`,
    e.g. images); else `last`, the previous step's measured cost."""
    per_step = getattr(estimator, "queries_per_step", None)
    counter = objective.counter
    convert = getattr(counter, "step_cost", None)
    if callable(per_step) and (type(counter) is QueryCounter or callable(convert)):
        queries = per_step(objective.coords.dim if coords is None else len(coords))
        return queries if type(counter) is QueryCounter else convert(queries, batch)
    return last
