"""The batched evaluator: many coordinate queries per pass, each one exact.

For a coordinate of a conv/linear/BatchNorm parameter the perturbed layer output is the base output
plus a one-channel term (the output is linear in the parameter), so nothing before that layer is
rerun; the changed channel is carried alone through per-channel layers, and the K perturbations of a
chunk are stacked along the batch dimension from the next channel-mixing layer on, with BatchNorm
statistics kept per perturbation (see `fastpaths`). The last linear layer's coordinates thus cost
no forward at all. Parameters of other leaves are perturbed in place and only that leaf is rerun.
The chunk size K per parameter tensor is bounded by a memory budget and, unless fixed, picked by
timing on first use (on CPU, stacking big activations can be slower than looping: K=1 wins there).
"""

from __future__ import annotations

import math
import time
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .evaluators import EVALUATORS, FeatureReuse
from .fastpaths import (
    Leaf,
    Node,
    Propagator,
    State,
    Trace,
    describe,
    grouped_batchnorm,
    is_standard,
    leaves,
    linear_source,
    trace,
)
from .objective import Batch, Objective, StagedObjective, forked_rng
from .stacked import DEFAULT_CHUNK, StackedObjective, stacked_coordinate_losses
from .stage_check import close


class StepCache(list):
    """FeatureReuse's cache of stage inputs (so `query` still works), plus the per-layer trace of this
    step's base point, filled lazily."""

    def __init__(self, stage_inputs: list[Tensor]):
        super().__init__(stage_inputs)
        self.traces: Trace = {}
        self.traced: set[int] = set()


@dataclass
class Site:
    """Where a parameter tensor lives: its stage, the path to its leaf, its name in the leaf."""

    stage: int
    path: tuple[Node, ...]
    pname: str
    linear: bool
    chunk: int | None = None  # K once tuned
    trial: int = 1  # next K to time while tuning
    best: tuple[float, int] = (math.inf, 1)  # (seconds per coordinate, K) so far

    @property
    def module(self) -> nn.Module:
        leaf = self.path[-1]
        assert isinstance(leaf, Leaf)
        return leaf.module


class Plan:
    """Stage trees of one objective and the site of every parameter that has exactly one owner,
    that no other module of the stages reads, and that is read nowhere after it (see
    `BatchedEvaluator._read_later`)."""

    def __init__(self, objective: StagedObjective):
        self.stages = list(objective.stages)
        self.stage_by_param = {id(b.param): b.stage for b in objective.coords.blocks}
        self.readers = objective.readers
        self.trees = [describe(s) for s in self.stages]
        self.vmap_loss = True
        self.checked: set[int] = set()  # parameters whose later use was checked
        self.excluded: set[int] = set()  # ... and found: they take the exact loop
        self.index()

    def index(self) -> None:
        found = [
            (id(p), Site(s, path, pname, _linearizable(leaf.module, pname)))
            for s, tree in enumerate(self.trees)
            for leaf, path in leaves(tree)
            for pname, p in leaf.module.named_parameters()
        ]
        owners = Counter(pid for pid, _ in found)
        old = getattr(self, "sites", {})
        self.sites = {
            pid: site
            for pid, site in found
            if owners[pid] == 1 and pid not in self.excluded and self._read_only_at(pid, site)
        }
        for pid, site in self.sites.items():
            if pid in old and old[pid].path == site.path:
                site.chunk, site.trial, site.best = old[pid].chunk, old[pid].trial, old[pid].best

    def _read_only_at(self, pid: int, site: Site) -> bool:
        """The parameter's owning stage is the site's, and only the site's leaf reads it there."""
        inside = set(site.module.modules())
        return self.stage_by_param.get(pid) == site.stage and self.readers.get(pid, set()) <= inside

    def make_opaque(self, stage: int) -> None:
        """The tree did not reproduce the stage: run it as one leaf from now on."""
        self.trees[stage] = Leaf(self.stages[stage])
        self.index()


def _linearizable(module: nn.Module, pname: str) -> bool:
    kinds = (nn.Conv2d, nn.Linear, _BatchNorm)
    return pname in ("weight", "bias") and any(is_standard(module, k) for k in kinds)


class BatchedEvaluator(FeatureReuse):
    """Exact coordinate queries evaluated K at a time with the layer-level fast paths.

    max_batch_bytes bounds the activations of one chunk (K is derived from the traced activation
    sizes); `chunk` fixes K instead of timing candidates. channels_last runs the base query's stage
    inputs, and so the traced and stacked 4-D activations, in NHWC (default: on CPU, where BatchNorm,
    pooling and convs are several times faster in that layout; values change by float rounding, and
    queries and base change alike: at a zero step every query reproduces the base loss bit for bit).
    A `StackedObjective` gets K perturbed parameter vectors per call (`stacked`). Coordinates of
    parameters shared by several layers or read again after their layer (a weight penalty in the loss,
    found by a check on first use), and objectives that are not staged or have a stage writing into
    its input, use the FeatureReuse loop. Query accounting is the FeatureReuse one (one query restarted
    at the owning stage per coordinate), so budgets mean the same thing whichever evaluator runs them.
    """

    name = "batched"

    def __init__(
        self, max_batch_bytes: int = 256 * 2**20, chunk: int | None = None, channels_last: bool | None = None
    ):
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.max_batch_bytes, self.chunk, self.channels_last = int(max_batch_bytes), chunk, channels_last
        self._plans: weakref.WeakKeyDictionary[Objective, Plan | None] = weakref.WeakKeyDictionary()
        self._tuned: dict[str, dict[str, Any]] = {}  # loaded tuning state, by parameter name

    def state_dict(self) -> dict[str, Any]:
        """Chunk-size tuning so far, by parameter name: chunking changes float rounding, so a resumed
        run must batch exactly as the run it continues (checkpointed by the Trainer)."""
        sites = dict(self._tuned)
        for objective, plan in self._plans.items():
            for b in objective.coords.blocks if plan is not None else ():
                site = plan.sites.get(id(b.param))
                if site is not None:
                    sites[b.name] = {"chunk": site.chunk, "trial": site.trial, "best": list(site.best)}
        return {"sites": sites}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore tuning state; applied to plans built later (and to existing ones now)."""
        self._tuned = dict(state["sites"])
        for objective, plan in self._plans.items():
            if plan is not None:
                self._apply_tuned(objective, plan)

    def _apply_tuned(self, objective: Objective, plan: Plan) -> None:
        for b in objective.coords.blocks:
            site, tuned = plan.sites.get(id(b.param)), self._tuned.get(b.name)
            if site is not None and tuned is not None:
                site.chunk, site.trial, site.best = tuned["chunk"], tuned["trial"], tuple(tuned["best"])

    def base(self, objective: Objective, batch: Batch) -> tuple[Tensor, Any]:
        """The base query, its stages on inputs in the layout the coordinate queries will run in: each
        query's loss is compared with this one, so the two must round alike (an NCHW base against NHWC
        queries put a layout offset of up to 4e-6 into every ResNet-20 loss difference: 8e-4 in the
        gradient at mu = 5e-3, against a median |gradient| of 1.7e-3)."""
        if isinstance(objective, StagedObjective):
            device = next(objective.module.parameters()).device
            objective.stage_format = torch.channels_last if self._nhwc(device) else None
        loss, cache = super().base(objective, batch)
        return loss, (StepCache(cache) if isinstance(cache, list) else cache)

    def _nhwc(self, device: torch.device) -> bool:
        return device.type == "cpu" if self.channels_last is None else self.channels_last

    def plan(self, objective: Objective) -> Plan | None:
        """The objective's stage trees and parameter sites, built once (None: not batchable)."""
        if objective not in self._plans:
            custom_bn = any(
                isinstance(m, _BatchNorm) and not is_standard(m, _BatchNorm)
                for m in objective.module.modules()
            )
            staged = (
                isinstance(objective, StagedObjective) and not custom_bn and not any(objective.writes_input)
            )
            plan = Plan(objective) if staged else None
            if plan is not None:
                self._apply_tuned(objective, plan)
            self._plans[objective] = plan
        return self._plans[objective]

    def coordinate_losses(
        self, objective: Objective, batch: Batch, context: Any, coords: Tensor, step: float
    ) -> Tensor:
        if isinstance(objective, StackedObjective):  # not staged, but K parameter vectors per call
            chunk = self.chunk or DEFAULT_CHUNK
            return stacked_coordinate_losses(objective, batch, context, coords, step, chunk)
        plan = self.plan(objective) if isinstance(context, StepCache) else None
        if plan is None or not len(coords):
            return super().coordinate_losses(objective, batch, context, coords, step)
        out = torch.empty(len(coords), dtype=torch.float64)
        groups = list(objective.coords.split(coords))
        with torch.no_grad(), grouped_batchnorm(objective.module, context[0].shape[0]):
            self._trace(plan, objective, batch, context, min(block.stage for block, _, _ in groups))
            for block, positions, local in groups:
                site = plan.sites.get(id(block.param))
                if site is not None and id(block.param) not in plan.checked:
                    plan.checked.add(id(block.param))
                    if self._read_later(plan, site, objective, batch, context, block.param):
                        plan.excluded.add(id(block.param))
                        del plan.sites[id(block.param)]
                        site = None
                if site is None:
                    out[positions] = super().coordinate_losses(
                        objective, batch, context, local + block.start, step
                    )
                    continue
                out[positions] = self._site_losses(plan, site, objective, batch, context, local, step)
                objective.counter.add(len(local), len(local) * objective.stage_cost(block.stage))
        return out

    def _trace(
        self, plan: Plan, objective: StagedObjective, batch: Batch, ctx: StepCache, first: int
    ) -> None:
        """Trace stages first.. on the cached inputs; a tree that does not reproduce its stage's
        cached output (a custom forward, a hook) makes that stage opaque."""
        for s in range(first, len(plan.trees)):
            if s in ctx.traced:
                continue
            x = ctx[s]  # in the layout the base query ran it (`base`)
            y = trace(plan.trees[s], x, ctx.traces)
            # The last stage's output is not cached; rerunning the stage (not the loss, which may be a
            # black box that counts and charges every call) gives the base output to check against.
            want = ctx[s + 1] if s + 1 < len(plan.trees) else forked_rng(batch, lambda s=s: plan.stages[s](ctx[s]))
            if not close(y, want):
                plan.make_opaque(s)
                trace(plan.trees[s], x, ctx.traces)
            ctx.traced.add(s)

    def _read_later(
        self, plan: Plan, site: Site, objective: StagedObjective, batch: Batch, ctx: StepCache, param: nn.Parameter
    ) -> bool:
        """Whether the later stages or the loss read `param` itself (a weight penalty in the loss,
        say): the fast paths change only its leaf's output, so such a parameter takes the exact loop.
        Found by running them from the cached input with the parameter moved and not moved."""
        s = site.stage
        h = ctx[s + 1] if s + 1 < len(ctx) else ctx.traces[site.path[0]][1]

        def run_later() -> Tensor:
            out = h
            for stage in plan.stages[s + 1 :]:
                out = stage(out)
            return objective.loss_fn(out, batch)

        def later() -> Tensor:
            return forked_rng(batch, run_later)

        flat = param.data.view(-1)
        saved = flat.clone()
        base = later()
        try:
            flat.add_(1.0)
            moved = later()
        finally:
            flat.copy_(saved)
        return not torch.equal(base, moved)

    def _memory_chunk(self, plan: Plan, ctx: StepCache, stage: int) -> int:
        """Largest K whose stacked activations (about 4 live copies of the largest one from this stage
        on) fit max_batch_bytes."""
        sizes = [ctx.traces[leaf][1] for leaf, _ in leaves(plan.trees[stage])] + list(ctx[stage + 1 :])
        largest = max(t.numel() * t.element_size() for t in sizes)
        return max(1, self.max_batch_bytes // (4 * largest))

    def _site_losses(
        self,
        plan: Plan,
        site: Site,
        objective: StagedObjective,
        batch: Batch,
        ctx: StepCache,
        local: Tensor,
        step: float,
    ) -> Tensor:
        local = local.to(site.module.get_parameter(site.pname).device)
        n, k_max = len(local), self._memory_chunk(plan, ctx, site.stage)
        results, start = [], 0

        def run(k: int) -> None:
            nonlocal start
            results.append(self._chunk(plan, site, objective, batch, ctx, local[start : start + k], step))
            start += k

        # Tune (across calls): time K = 1, 4, 16, ... up to the memory bound, keep the fastest; grow
        # until a K is clearly slower (one timing is noisy on a shared machine).
        while self.chunk is None and site.chunk is None and start < n:
            size = min(site.trial, k_max, n - start)
            t0 = time.perf_counter()
            run(size)
            per = (time.perf_counter() - t0) / size
            if per < site.best[0]:
                site.best = (per, size)
            if size == min(site.trial, k_max):
                if per > 1.25 * site.best[0] or size >= k_max:
                    site.chunk = site.best[1]
                site.trial *= 4
        k = self.chunk or min(site.chunk or site.best[1], k_max)
        while start < n:
            run(min(k, n - start))
        return torch.cat(results)

    def _chunk(
        self,
        plan: Plan,
        site: Site,
        objective: StagedObjective,
        batch: Batch,
        ctx: StepCache,
        local: Tensor,
        step: float,
    ) -> Tensor:
        """Losses of the K coordinates `local` of one parameter tensor."""
        k, leaf = len(local), site.path[-1]
        x, y = ctx.traces[leaf]
        state: State = linear_source(site.module, site.pname, local, step, x, y) if site.linear else None
        if state is None:
            state = _rerun(site.module, site.pname, local, step, x)
        prop = Propagator(ctx.traces, k)
        state = prop.resume(site.path, state)
        for s in range(site.stage + 1, len(plan.trees)):
            state = plan.stages[s](state) if isinstance(state, Tensor) else prop.run(plan.trees[s], state)
        outputs = prop.dense(state, ctx.traces[plan.trees[-1]][1])
        return self._losses(plan, objective, batch, outputs.view(k, -1, *outputs.shape[1:]))

    def _losses(self, plan: Plan, objective: StagedObjective, batch: Batch, outputs: Tensor) -> Tensor:
        """loss_fn per perturbation; vmapped for many perturbations when the loss allows it (vmap costs
        about as much as a loop of 64 calls)."""
        if plan.vmap_loss and len(outputs) >= 64:
            try:
                return torch.func.vmap(lambda out: objective.loss_fn(out, batch))(outputs).to(
                    "cpu", torch.float64
                )
            except Exception:  # any loss vmap cannot batch: the loop below is the same math
                plan.vmap_loss = False
        return torch.stack([objective.loss_fn(out, batch) for out in outputs]).to("cpu", torch.float64)


EVALUATORS["batched"] = (
    BatchedEvaluator  # registered here: evaluators.py importing this module would be circular
)


def _rerun(module: nn.Module, pname: str, local: Tensor, step: float, x: Tensor) -> Tensor:
    """Outputs of `module` with each coordinate perturbed in turn (no closed form), stacked."""
    flat = module.get_parameter(pname).data.view(-1)
    outs = []
    for j in local.tolist():
        old = flat[j].clone()
        flat[j] += step
        try:
            outs.append(module(x))
        finally:
            flat[j] = old
    return torch.cat(outs)

