"""Query accounting: the cost currency of zeroth-order training.

A *query* is one evaluation of the loss at one parameter point on one batch. Its cost in
*forward-equivalents* is the fraction of a full forward it actually ran (a query restarted at a late
stage from cached activations costs less than 1). Objectives count; trainers report.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


class QueryBudgetExceeded(RuntimeError):
    """Raised between steps when a run has spent its query budget (the trainer stops cleanly)."""


@dataclass
class QueryCounter:
    queries: int = 0
    forward_equivalents: float = 0.0

    def add(self, queries: int, forward_equivalents: float) -> None:
        self.queries += queries
        self.forward_equivalents += forward_equivalents

    def snapshot(self) -> QueryCounter:
        return QueryCounter(self.queries, self.forward_equivalents)

    def since(self, earlier: QueryCounter) -> QueryCounter:
        return QueryCounter(self.queries - earlier.queries, self.forward_equivalents - earlier.forward_equivalents)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.queries = int(state["queries"])
        self.forward_equivalents = float(state["forward_equivalents"])
