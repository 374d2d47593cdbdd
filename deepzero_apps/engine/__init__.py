"""The zeroth-order engine: coordinates, objectives, evaluators, estimators, query accounting."""

from .batchnorm import frozen_running_stats
from .coords import Block, CoordinateView
from .estimators import CGE, RGE, FirstOrder
from .evaluators import FeatureReuse, ReferenceEvaluator, make_evaluator
from .objective import Objective, StagedObjective, model_stages
from .queries import QueryBudgetExceeded, QueryCounter

__all__ = [
    "CGE",
    "RGE",
    "Block",
    "CoordinateView",
    "FeatureReuse",
    "FirstOrder",
    "Objective",
    "QueryBudgetExceeded",
    "QueryCounter",
    "ReferenceEvaluator",
    "StagedObjective",
    "frozen_running_stats",
    "make_evaluator",
    "model_stages",
]
