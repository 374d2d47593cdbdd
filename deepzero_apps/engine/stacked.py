"""Queries of objectives that evaluate many parameter vectors in one call.

A model behind a black box (a rollout through a numpy solver) has no stages to restart from, but it
can often run K parameter sets at once: the network with stacked weights (`call_stacked`: grouped
convolutions over the K weight sets, or one vmapped call) and the black box on all K x B inputs in one call.
Such an objective is a `StackedObjective`; `StackedEvaluator` (and the batched evaluator, which
delegates to it) turns a CGE coordinate list into chunks of K perturbed parameter vectors.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .evaluators import EVALUATORS, FeatureReuse
from .objective import Batch, Objective
from .stage_check import close

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
    """`module(x[k])` with parameters `params[name][k]` for every k; parameters not in `params` (and
    buffers) are the module's own.

    A fully convolutional network (all its parameters stacked and owned by convs, no buffers such as
    BatchNorm statistics) runs once on the inputs laid out as (B, K x C, H, W), channels last: each
    conv is one grouped convolution over the K weight sets (`_GroupedConvs`), and activations or
    residual sums do not care about the layout. Anything else runs vmapped; torch's batching rule also
    makes grouped convolutions, but moves the K axis to and from the NCHW channel axis around every
    conv, which cost ~1.5x in the small correction nets of ZO-SOL. The first call of a module checks
    the grouped layout against vmap (a layer that reads the channel axis, e.g. a flatten, would not
    fit it) and keeps vmap for that module if they differ.
    """

    def vmapped() -> Tensor:
        return torch.func.vmap(lambda p, xk: functional_call(module, p, (xk,)))(params, x)

    if not _fully_convolutional(module, params) or _GROUPED_OK.get(module) is False:
        return vmapped()
    k = x.shape[0]
    grouped = x.transpose(0, 1).flatten(1, 2).contiguous(memory_format=torch.channels_last)
    with _GroupedConvs(k):
        out = functional_call(module, params, (grouped,))
    out = out.unflatten(1, (k, -1)).transpose(0, 1) if out.dim() == 4 and out.shape[1] % k == 0 else None
    if module not in _GROUPED_OK:  # the same path on every later call (and rank): same rounding
        want = vmapped()
        _GROUPED_OK[module] = out is not None and close(out, want)
        return out if _GROUPED_OK[module] else want
    return out


_GROUPED_OK: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def _fully_convolutional(module: nn.Module, params: dict[str, Tensor]) -> bool:
    """Every parameter stacked and owned by an ungrouped Conv2d, and no buffers."""
    convs = {name: m for name, m in module.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1}
    owned = all(name.rpartition(".")[0] in convs for name, _ in module.named_parameters())
    return owned and len(params) == len(list(module.parameters())) and next(module.buffers(), None) is None


class _GroupedConvs(torch.overrides.TorchFunctionMode):
    """conv2d calls with a stacked (K, O, C, kh, kw) weight on a (B, K x C, H, W) input: one grouped
    convolution, output (B, K x O, H', W')."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d and args[1].dim() == 5:  # nn.Conv2d passes every argument by position
            return grouped_conv2d(*args[:6])
        return func(*args, **kwargs)


PADDED_WIDTH = 4  # output channels per group that CPU grouped convolutions run fast at


def grouped_conv2d(x: Tensor, w: Tensor, b: Tensor | None, stride, padding, dilation) -> Tensor:
    """`conv2d` of x (B, K x C, H, W) with K stacked weights w (K, O, C, kh, kw): one grouped convolution.

    oneDNN runs groups of fewer than 4 output channels on a slow path (the correction net's 4 -> 2
    output layer: 2.2x the time of the same layer zero-padded to 4 outputs per group), so on the CPU
    such groups are padded with zero weights and the extra channels dropped. A fixed rule, not a timing:
    the two forms differ in the last bits, and every rank, every resumed run and the single process they
    are checked against must run the same kernels (a per-process timing once made 2 ranks differ from
    1 process by 2e-14).
    """
    k, o = w.shape[:2]
    if o < PADDED_WIDTH and x.device.type == "cpu":
        extra = PADDED_WIDTH - o
        w, b = F.pad(w, (0, 0, 0, 0, 0, 0, 0, extra)), None if b is None else F.pad(b, (0, extra))
    out = F.conv2d(x, w.flatten(0, 1), None if b is None else b.flatten(), stride, padding, dilation, k)
    return out if w.shape[1] == o else out.unflatten(1, (k, w.shape[1]))[:, :, :o].flatten(1, 2)


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
