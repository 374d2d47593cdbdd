"""Evaluators: how the queries an estimator asks for are run.

An estimator decides *which* points to query and how to combine the losses; an evaluator decides
*how* to run them. Every evaluator must return the same losses as `ReferenceEvaluator` (tested in
float64); faster ones only skip work whose result is known.
"""

from __future__ import annotations

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
