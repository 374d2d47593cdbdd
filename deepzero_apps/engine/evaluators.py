"""Evaluators: how the queries an estimator asks for are run.

An estimator decides *which* points to query and how to combine the losses; an evaluator decides
*how* to run them. Every evaluator must return the same losses as `ReferenceEvaluator` (tested in
float64); faster ones only skip work whose result is known.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .objective import Batch, Objective


class ReferenceEvaluator:
    """Ground truth: perturb one coordinate, rerun the whole model."""

    name = "reference"

    def base(self, objective: Objective, batch: Batch) -> tuple[torch.Tensor, Any]:
        """The step's base query: a real forward (BatchNorm statistics update once here)."""
        return objective.loss(batch), None

    def query(self, objective: Objective, batch: Batch, context: Any, stage: int) -> torch.Tensor:
        """Loss at the current (perturbed) parameters; nothing before `stage` changed."""
        return objective.loss(batch)

    def coordinate_losses(
        self, objective: Objective, batch: Batch, context: Any, coords: torch.Tensor, step: float
    ) -> torch.Tensor:
        """Loss at theta + step * e_i for every coordinate i in `coords` (float64, in input order)."""
        out = torch.empty(len(coords), dtype=torch.float64)
        for block, positions, local in objective.coords.split(coords):
            flat = block.flat
            for pos, j in zip(positions.tolist(), local.tolist()):
                old = flat[j].clone()
                flat[j] += step
                out[pos] = float(self.query(objective, batch, context, block.stage))
                flat[j] = old
        return out

    def direction_losses(
        self,
        objective: Objective,
        batch: Batch,
        context: Any,
        directions: Sequence[torch.Tensor],
        coords: torch.Tensor | None,
        step: float,
        indices: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Loss at theta + step * u_i for every direction i in `indices` (default all; float64, in
        order); each u_i spans `coords` (all coordinates if None). Parameters are restored on exit."""
        view = objective.coords
        theta0 = view.flatten()
        idx = None if coords is None else coords.to(theta0.device)
        stage = int(view.stage_of(coords).min()) if coords is not None else min(b.stage for b in view.blocks)
        todo = range(len(directions)) if indices is None else indices
        out = torch.empty(len(todo), dtype=torch.float64)
        try:
            for n, i in enumerate(todo):
                theta = theta0.clone()
                if idx is None:
                    theta.add_(directions[i], alpha=step)
                else:
                    theta[idx] += step * directions[i]
                view.assign(theta)
                out[n] = float(self.query(objective, batch, context, stage))
        finally:
            view.assign(theta0)
        return out


class FeatureReuse(ReferenceEvaluator):
    """Cache every stage's input in the base query; a query restarts at the perturbed stage."""

    name = "reuse"

    def base(self, objective: Objective, batch: Batch) -> tuple[torch.Tensor, Any]:
        return objective.forward_cached(batch)

    def query(self, objective: Objective, batch: Batch, context: Any, stage: int) -> torch.Tensor:
        return objective.loss_from(stage, context, batch)


EVALUATORS: dict[str, type[ReferenceEvaluator]] = {"reference": ReferenceEvaluator, "reuse": FeatureReuse}


def make_evaluator(spec: str | ReferenceEvaluator) -> ReferenceEvaluator:
    if isinstance(spec, ReferenceEvaluator):
        return spec
    if spec not in EVALUATORS:
        raise ValueError(f"unknown evaluator '{spec}'; choose from: {', '.join(EVALUATORS)}")
    return EVALUATORS[spec]()
