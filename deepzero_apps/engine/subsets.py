"""Trainable subsets: which of a model's parameters a step estimates; everything else stays frozen.

A ZO step costs one query per estimated coordinate, so fine-tuning a part of a model is often what a
query budget affords. A subset is a list of parameter names, passed to an objective as
`trainable=in_subset(names)`: the estimators, the sparse sampler, feature reuse and the batched
evaluator then work on it unchanged. Feature reuse restarts every perturbed query at the first
stage it perturbs, so the stages before the first trainable one run once per step (the base query).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from fnmatch import fnmatch

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from .objective import model_stages

SUBSETS = ("all", "last", "norm")
NORM_LAYERS = (_NormBase, nn.GroupNorm, nn.LayerNorm)  # BatchNorm / InstanceNorm, GroupNorm, LayerNorm


def select_parameters(model: nn.Module, spec: str | Sequence[str], last: int = 1) -> list[str]:
    """Names of the parameters of `model` that `spec` selects, in model order.

    spec: ``all``; ``last`` (the parameters of the last `last` stages, see `model_stages`); ``norm``
    (the affine parameters of normalisation layers); or a list of fnmatch patterns over parameter
    names (e.g. ``["5.*"]``), each of which must match. ValueError names what matched nothing.
    """
    named = list(model.named_parameters())
    names = [n for n, _ in named]
    if isinstance(spec, str):
        if spec == "all":
            chosen = set(names)
        elif spec == "last":
            stages = model_stages(model)
            if not 1 <= last <= len(stages):
                raise ValueError(f"last={last} must be between 1 and the model's {len(stages)} stages")
            ids = {id(p) for s in stages[-last:] for p in s.parameters()}
            chosen = {n for n, p in named if id(p) in ids}
        elif spec == "norm":
            ids = {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}
            chosen = {n for n, p in named if id(p) in ids}
        else:
            raise ValueError(f"unknown parameter subset '{spec}'; choose {', '.join(SUBSETS)} or a list of name patterns")
    else:
        chosen = set()
        for pattern in spec:
            matched = {n for n in names if fnmatch(n, str(pattern))}
            if not matched:
                raise ValueError(f"parameter pattern '{pattern}' matches none of {type(model).__name__}'s parameters "
                                 f"({', '.join(names)})")
            chosen |= matched
    if not chosen:
        raise ValueError(f"parameter subset '{spec}' selects no parameter of {type(model).__name__}")
    return [n for n in names if n in chosen]


def in_subset(names: Sequence[str]) -> Callable[[str, nn.Parameter], bool]:
    """The `trainable` predicate of an objective that trains exactly `names`."""
    keep = frozenset(names)
    return lambda name, p: name in keep
