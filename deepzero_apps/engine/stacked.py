"""Queries of objectives that evaluate many parameter vectors in one call.

A model behind a black box (a rollout through a numpy solver) has no stages to restart from, but it
can often run K parameter sets at once: the network with stacked weights (`call_stacked`, one vmapped
call that torch turns into grouped convolutions) and the black box on all K x B inputs in one call.
Such an objective is a `StackedObjective`; `StackedEvaluator` (and the batched evaluator, which
delegates to it) turns a CGE coordinate list into chunks of K perturbed parameter vectors.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .evaluators import EVALUATORS, FeatureReuse
from .objective import Batch, Objective

DEFAULT_CHUNK = 256  # perturbed parameter vectors per call


class StackedObjective(Objective):
    """An objective that also evaluates K parameter vectors at once.

    Subclasses implement `_losses(thetas, batch, context)`: thetas is (K, d) in the coordinate
    order of `self.coords`, context is what `forward_cached` returned for the step's base query (work
    every perturbation shares), and the result is the K losses, each equal to `loss(batch)` with the
    parameters set to that row. Every row counts as one whole query.
    """

    def _losses(self, thetas: Tensor, batch: Batch, context: Any) -> Tensor:
        raise NotImplementedError

    def losses(self, thetas: Tensor, batch: Batch, context: Any = None) -> Tensor:
        self.counter.add(len(thetas), float(len(thetas)))
        return self._losses(thetas, batch, context)

    def stacked_parameters(self, thetas: Tensor) -> dict[str, Tensor]:
        """(K, d) coordinate vectors as {parameter name: (K, *shape)} for `call_stacked`."""
        k = len(thetas)
        return {b.name: thetas[:, b.start : b.stop].view(k, *b.param.shape) for b in self.coords.blocks}


def call_stacked(module: nn.Module, params: dict[str, Tensor], x: Tensor) -> Tensor:
    """`module(x[k])` with parameters `params[name][k]` for every k, in one vmapped call; parameters
    not in `params` (and buffers) are the module's own. torch's batching rule runs a conv whose weight
    and input are both batched as one grouped convolution, so this is the stacked-weights network."""
    return torch.func.vmap(lambda p, xk: functional_call(module, p, (xk,)))(params, x)


def stacked_coordinate_losses(
    objective: StackedObjective, batch: Batch, context: Any, coords: Tensor, step: float, chunk: int
) -> Tensor:
    """Loss at theta + step * e_i for every i in `coords`, `chunk` parameter vectors per call."""
    theta0 = objective.coords.flatten()
    out = torch.empty(len(coords), dtype=torch.float64)
    for lo in range(0, len(coords), chunk):
        idx = coords[lo : lo + chunk].to(theta0.device)
        thetas = theta0.repeat(len(idx), 1)
        thetas[torch.arange(len(idx), device=idx.device), idx] += step  # same rounding as flat[j] += step
        out[lo : lo + len(idx)] = objective.losses(thetas, batch, context).to("cpu", torch.float64)
    return out


class StackedEvaluator(FeatureReuse):
    """CGE queries of a `StackedObjective`, `chunk` perturbed parameter vectors per call; any other
    objective runs the FeatureReuse loop."""

    name = "stacked"

    def __init__(self, chunk: int = DEFAULT_CHUNK):
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.chunk = int(chunk)

    def coordinate_losses(
        self, objective: Objective, batch: Batch, context: Any, coords: Tensor, step: float
    ) -> Tensor:
        if not isinstance(objective, StackedObjective) or not len(coords):
            return super().coordinate_losses(objective, batch, context, coords, step)
        return stacked_coordinate_losses(objective, batch, context, coords, step, self.chunk)


EVALUATORS["stacked"] = StackedEvaluator
