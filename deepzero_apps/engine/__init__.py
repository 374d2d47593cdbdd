"""The zeroth-order engine: coordinates, objectives, evaluators, estimators, query accounting."""

from .batched import BatchedEvaluator
from .batchnorm import frozen_running_stats
from .coords import Block, CoordinateView
from .distributed import ShardedEvaluator, barrier, init_distributed, is_main, on_rank0, rank, world_size
from .estimators import CGE, RGE, FirstOrder
from .evaluators import FeatureReuse, ReferenceEvaluator, make_evaluator
from .objective import Objective, StagedObjective, model_stages
from .precision import full_precision
from .pruning import (
    compute_ratios,
    grasp_scores,
    layer_ratios,
    prunable_weights,
    random_scores,
    uniform_ratios,
    zo_grasp_scores,
)
from .queries import QueryBudgetExceeded, QueryCounter
from .sparsity import DenseSampler, SparseCoordinateSampler, load_ratios, save_ratios
from .stacked import StackedEvaluator, StackedObjective, call_stacked
from .subsets import in_subset, select_parameters
from .zo_core import Directions, difference, direction_seed
from .zo_function import ZOFunction, zo_function

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
    "full_precision",
    "make_evaluator",
    "model_stages",
    "DenseSampler",
    "SparseCoordinateSampler",
    "compute_ratios",
    "grasp_scores",
    "layer_ratios",
    "load_ratios",
    "prunable_weights",
    "random_scores",
    "uniform_ratios",
    "save_ratios",
    "zo_grasp_scores",
    "BatchedEvaluator",
    "ShardedEvaluator",
    "StackedEvaluator",
    "StackedObjective",
    "call_stacked",
    "in_subset",
    "select_parameters",
    "barrier",
    "init_distributed",
    "on_rank0",
    "is_main",
    "rank",
    "world_size",
    "Directions",
    "difference",
    "direction_seed",
    "ZOFunction",
    "zo_function",
]
