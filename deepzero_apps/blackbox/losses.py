"""Losses on a black box's answers and the query counters a black-box run budgets with.

The Stab loss needs a score: logits or probabilities. A label-only black box is refused for training
before any work (the config says why) and is used only where labels suffice (targets, accuracy,
certification).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..engine import QueryCounter
from .wrapper import BlackBoxClassifier


def stability(outputs: Tensor, target: Tensor, kind: str, reduction: str = "mean") -> Tensor:
    """Stab loss of Salman et al.: cross-entropy of the classifier's output against its clean label."""
    if kind == "logits":
        return F.cross_entropy(outputs, target, reduction=reduction)
    if kind == "probs":
        return F.nll_loss(outputs.clamp_min(1e-12).log(), target, reduction=reduction)
    raise ValueError(f"the Stab loss needs logits or probs, not {kind}")


class DenoiserLoss:
    """``mse_weight * MSE(out, clean) + stab_weight * Stab(classifier(out), clean label)``: a StagedObjective loss_fn."""

    def __init__(self, classifier: Callable[[Tensor], Tensor], kind: str, mse_weight: float, stab_weight: float):
        self.classifier, self.kind, self.mse_weight, self.stab_weight = classifier, kind, mse_weight, stab_weight

    def __call__(self, out: Tensor, batch: Sequence[Tensor]) -> Tensor:
        stab = self.stab_weight * stability(self.classifier(out), batch[1], self.kind)
        return self.mse_weight * F.mse_loss(out, batch[0]) + stab if self.mse_weight else stab


class WhiteBox:
    """The classifier with gradients (FO-DS only), counting images like `BlackBoxClassifier` does."""

    def __init__(self, model: Callable[[Tensor], Tensor], output: str):
        self.model, self.output, self.queries = model, output, 0

    def __call__(self, x: Tensor) -> Tensor:
        self.queries += len(x)
        logits = self.model(x)
        return logits.softmax(1) if self.output == "probs" else logits

    def state_dict(self) -> dict[str, int]:
        return {"queries": self.queries}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.queries = int(state["queries"])


class ImageQueries:
    """An objective counter whose `queries` are the images its classifiers have seen (the budget's unit).

    The engine counts loss queries; a loss query here sends a whole batch, and ZO-AE-DS's queries
    are not parameter queries at all, so every mode reports and budgets the classifiers' own counts
    (restored on resume through the trainer's `extra_state`). Forward-equivalents stay the engine's.
    """

    def __init__(self, sources: Sequence[Any], calls_per_loss_query: int = 1):
        self.sources, self.loss_queries, self.forward_equivalents = list(sources), 0, 0.0
        self.calls_per_loss_query = calls_per_loss_query  # classifier calls on the batch per engine loss query

    @property
    def queries(self) -> int:
        return sum(s.queries for s in self.sources)

    def step_cost(self, loss_queries: int, batch: Any) -> int:
        """Images a step of `loss_queries` engine queries will send: each query classifies the whole batch
        `calls_per_loss_query` times (ZO-AE-DS: once per latent query), so budgets are checked before it."""
        images = len(batch[0] if isinstance(batch, (tuple, list)) else batch)
        return loss_queries * self.calls_per_loss_query * images

    def add(self, queries: int, forward_equivalents: float) -> None:
        self.loss_queries += queries
        self.forward_equivalents += forward_equivalents

    def snapshot(self) -> QueryCounter:
        return QueryCounter(self.queries, self.forward_equivalents)

    def since(self, earlier: QueryCounter) -> QueryCounter:
        return self.snapshot().since(earlier)

    def state_dict(self) -> dict[str, float]:
        return {"loss_queries": self.loss_queries, "forward_equivalents": self.forward_equivalents}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.loss_queries, self.forward_equivalents = int(state["loss_queries"]), float(state["forward_equivalents"])


def labels_of(blackbox: BlackBoxClassifier, x: Tensor, batch_size: int) -> Tensor:
    """Top-1 labels of the black box (counted queries), whatever its output kind."""
    out = torch.cat([blackbox(chunk) for chunk in x.split(batch_size)])
    return out if blackbox.output == "label" else out.argmax(1)
