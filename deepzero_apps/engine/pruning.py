"""Pruning-at-initialization scores and the layer-wise pruning ratios (LPR) derived from them.

DeepZero does not train a pruned model: it uses a pruning-at-init method only to decide *how sparse
each layer's gradient may be* (the LPR), then trains the dense model with sparse coordinate-wise
gradients (see `sparsity.SparseCoordinateSampler`). Only conv/linear weights are scored; biases and
BatchNorm parameters are left to the sampler (dense or excluded).

Scores are keyed by parameter name (`"1.conv1.weight"`), the names the engine's `CoordinateView`
uses, so an LPR plugs into the sampler without translation.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Literal

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from .batchnorm import frozen_running_stats
from .distributed import ShardedEvaluator
from .estimators import RGE
from .objective import StagedObjective
from .queries import QueryCounter

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Ordering = Literal["magnitude", "signed"]
Method = Literal["zo_grasp", "grasp", "random", "uniform"]


def prunable_weights(model: nn.Module, only: Collection[str] | None = None) -> dict[str, nn.Parameter]:
    """Conv and linear weights by parameter name, in model order: the tensors an LPR covers; with
    `only` (the names of a trainable subset), just those among them."""
    weights = {
        f"{name}.weight" if name else "weight": m.weight
        for name, m in model.named_modules()
        if isinstance(m, _ConvNd | nn.Linear)
    }
    if only is not None:
        weights = {n: w for n, w in weights.items() if n in only}
    if not weights:
        subset = "" if only is None else " among the trainable parameters"
        raise ValueError(f"{type(model).__name__} has no conv or linear weights to score{subset}")
    return weights


def _balanced_batch(
    data: tuple[torch.Tensor, torch.Tensor], samples_per_class: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `samples_per_class` examples of every class in `data`, as GraSP scores on a balanced batch."""
    x, y = data
    if samples_per_class < 1:
        raise ValueError(f"samples_per_class must be >= 1, got {samples_per_class}")
    picks = []
    for c in y.unique().tolist():
        idx = (y == c).nonzero().flatten()
        if len(idx) < samples_per_class:
            raise ValueError(
                f"class {c} has {len(idx)} examples, fewer than samples_per_class={samples_per_class}"
            )
        picks.append(idx[:samples_per_class])
    keep = torch.cat(picks)
    return x[keep], y[keep]


def zo_grasp_scores(
    model: nn.Module,
    loss_fn: LossFn,
    data: tuple[torch.Tensor, torch.Tensor],
    *,
    q: int = 192,
    mu: float = 5e-3,
    samples_per_class: int = 25,
    seed: int = 0,
    counter: QueryCounter | None = None,
    only: Collection[str] | None = None,
) -> dict[str, torch.Tensor]:
    """ZO-GraSP (DeepZero): score = -theta * Hg with Hg ~ (g(theta + mu g0) - g0) / mu.

    g0 and g(.) are Gaussian RGE estimates over the conv/linear weights with the *same* q directions
    (one seeded `RGE`, same step), so the direction noise largely cancels in the difference. The
    model runs in its current mode; weights are restored bit for bit after every query (from a copy,
    not from `state_dict()` views), BatchNorm running statistics and existing `.grad`s are untouched.
    The 2 (q + 1) loss queries are added to `counter` (a training run's), when given. `only`
    restricts the scored weights to a trainable subset (`prunable_weights`).
    """
    weights = prunable_weights(model, only)
    x, y = _balanced_batch(data, samples_per_class)
    device = next(iter(weights.values())).device
    batch = (x.to(device), y.to(device))
    names = set(weights)
    obj = StagedObjective(model, lambda out, b: loss_fn(out, b[1]), trainable=lambda n, p: n in names)
    view = obj.coords
    # Under torchrun the q directions are split over the ranks (one process: the reference loop).
    rge = RGE(q=q, mu=mu, distribution="gaussian", seed=seed, evaluator=ShardedEvaluator("reference"))
    saved_grads = [b.param.grad for b in view.blocks]
    theta = view.flatten()

    def rge_grad() -> torch.Tensor:
        rge.estimate(obj, batch, step=0)  # step fixed: both calls draw identical directions
        return torch.cat([b.param.grad.reshape(-1) for b in view.blocks]).to(torch.float64)

    try:
        with torch.no_grad(), frozen_running_stats(model):
            g0 = rge_grad()
            view.assign(theta + mu * g0.to(theta.dtype))
            hg = (rge_grad() - g0) / mu
    finally:
        view.assign(theta)
        for b, g in zip(view.blocks, saved_grads):
            b.param.grad = g
    if counter is not None:
        counter.add(obj.counter.queries, obj.counter.forward_equivalents)
    return {
        b.name: -(b.param.detach() * hg[b.start : b.stop].view_as(b.param).to(b.param.dtype))
        for b in view.blocks
    }


def grasp_scores(
    model: nn.Module,
    loss_fn: LossFn,
    data: tuple[torch.Tensor, torch.Tensor],
    *,
    samples_per_class: int = 25,
    only: Collection[str] | None = None,
) -> dict[str, torch.Tensor]:
    """First-order GraSP (Wang et al., 2020), the reference for ZO-GraSP: score = -theta * Hg.

    Hg is the Hessian-gradient product over the conv/linear weights by double backward, on the same
    balanced batch and loss as `zo_grasp_scores` (no temperature: pass a scaled loss_fn for one).
    """
    x, y = _balanced_batch(data, samples_per_class)
    weights = prunable_weights(model, only)
    params = list(weights.values())
    x, y = x.to(params[0].device), y.to(params[0].device)
    with torch.enable_grad(), frozen_running_stats(model):
        grads = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
        z = sum((g * g.detach()).sum() for g in grads)
        hg = torch.autograd.grad(z, params)
    return {name: -(p.detach() * h) for (name, p), h in zip(weights.items(), hg)}


def random_scores(model: nn.Module, seed: int = 0, only: Collection[str] | None = None) -> dict[str, torch.Tensor]:
    """Gaussian scores: the random-pruning baseline (every layer ends up near the global sparsity)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p)
        for name, p in prunable_weights(model, only).items()
    }


def uniform_ratios(model: nn.Module, sparsity: float, only: Collection[str] | None = None) -> dict[str, float]:
    """The same ratio for every conv/linear weight: the no-scorer baseline the scored LPRs must beat."""
    sparsity = _check_sparsity(sparsity)
    return {name: sparsity for name in prunable_weights(model, only)}


def _check_sparsity(sparsity: float) -> float:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return float(sparsity)


def layer_ratios(
    scores: dict[str, torch.Tensor], sparsity: float, ordering: Ordering = "magnitude"
) -> dict[str, float]:
    """Per-layer pruning ratios from one global threshold over all scores.

    Exactly round(sparsity * total) weights are pruned (ties broken by position), so the
    size-weighted mean of the ratios is the requested sparsity up to that rounding.

    ordering="magnitude": keep the largest |score| (the official DeepZero code, which prunes with
        `L1Unstructured` on the ZO-GraSP scores).
    ordering="signed": prune the highest signed scores, keep the lowest (the GraSP paper: with
        score = -theta * Hg, removing the highest scores least reduces the gradient flow).
    """
    sparsity = _check_sparsity(sparsity)
    if ordering not in ("magnitude", "signed"):
        raise ValueError(f"unknown ordering '{ordering}'; choose magnitude or signed")
    if not scores:
        raise ValueError("no scores to threshold")
    flat = torch.cat([s.detach().reshape(-1).to("cpu", torch.float64) for s in scores.values()])
    key = -flat.abs() if ordering == "magnitude" else flat  # larger key = pruned first
    n_prune = round(sparsity * flat.numel())
    pruned = torch.zeros(flat.numel(), dtype=torch.bool)
    pruned[torch.topk(key, n_prune, sorted=False).indices] = True
    ratios, start = {}, 0
    for name, s in scores.items():
        ratios[name] = pruned[start : start + s.numel()].sum().item() / s.numel()
        start += s.numel()
    return ratios


def compute_ratios(
    method: Method,
    model: nn.Module,
    loss_fn: LossFn | None = None,
    data: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    sparsity: float,
    ordering: Ordering = "magnitude",
    seed: int = 0,
    q: int = 192,
    mu: float = 5e-3,
    samples_per_class: int = 25,
    counter: QueryCounter | None = None,
    only: Collection[str] | None = None,
) -> dict[str, float]:
    """Score `model` with `method` and turn the scores into an LPR (one call for configs and the CLI).

    q, mu and counter are ZO-GraSP's, samples_per_class both GraSPs'; "random" and "uniform" need no
    loss or data ("uniform" has no scores: every layer gets `sparsity` itself). `only` (a trainable
    subset's parameter names) scores and thresholds just its weights.
    """
    _check_sparsity(sparsity)
    if method == "uniform":
        return uniform_ratios(model, sparsity, only)
    if method == "random":
        scores = random_scores(model, seed, only)
    elif method in ("zo_grasp", "grasp"):
        if loss_fn is None or data is None:
            raise ValueError(f"method '{method}' needs loss_fn and data")
        if method == "zo_grasp":
            scores = zo_grasp_scores(
                model, loss_fn, data, q=q, mu=mu, samples_per_class=samples_per_class, seed=seed, counter=counter,
                only=only,
            )
        else:
            scores = grasp_scores(model, loss_fn, data, samples_per_class=samples_per_class, only=only)
    else:
        raise ValueError(f"unknown pruning method '{method}'; choose zo_grasp, grasp, random or uniform")
    return layer_ratios(scores, sparsity, ordering)
