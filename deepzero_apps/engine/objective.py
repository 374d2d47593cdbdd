"""Objectives: the one thing a task writes for the engine.

An objective owns the trainable module and knows how to turn a batch into a scalar loss. A
*staged* objective additionally exposes the model as an ordered list of stages, so evaluators can
cache each stage's input once per step and restart a perturbed query at the stage that owns the
perturbed parameter (feature reuse). Objectives that cannot be staged (a rollout through a solver)
use the base class: every query then runs the whole loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..errors import ConfigError
from .batchnorm import frozen_running_stats
from .coords import CoordinateView
from .queries import QueryCounter
from .stage_check import check_composition, owners, record_reads, registering_stages

Batch = Any


class Objective:
    """Loss of `module` on a batch, with every query counted.

    Subclasses implement `_loss(batch)`. The engine calls `loss` (whole query), `forward_cached`
    (base query, keeps a cache) and `loss_from` (query restarted at a stage); the base class has a
    single stage, so `loss_from` is a whole query.
    """

    num_stages = 1

    def __init__(self, module: nn.Module, trainable: Callable[[str, nn.Parameter], bool] | None = None):
        self.module = module
        self.counter = QueryCounter()
        keep = trainable or (lambda name, p: p.requires_grad)
        named = [(n, p) for n, p in module.named_parameters() if keep(n, p)]
        if not named:
            raise ValueError("objective has no trainable parameters")
        self.coords = CoordinateView(named, [self._stage_of_param(p) for _, p in named])

    def _stage_of_param(self, p: nn.Parameter) -> int:
        return 0

    def block_stages(self) -> list[int]:
        """The stage a query perturbing each trainable tensor restarts from (the stages before it run once)."""
        return [b.stage for b in self.coords.blocks]

    def _loss(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def stage_cost(self, stage: int) -> float:
        """Fraction of a whole forward that a query restarted at `stage` runs."""
        return 1.0

    def loss(self, batch: Batch) -> torch.Tensor:
        self.counter.add(1, 1.0)
        return self._loss(batch)

    def forward_cached(self, batch: Batch) -> tuple[torch.Tensor, Any]:
        return self.loss(batch), None

    def loss_from(self, stage: int, cache: Any, batch: Batch) -> torch.Tensor:
        return self.loss(batch)


def model_stages(model: nn.Module) -> list[nn.Module]:
    """Stages of a model: `model.stages()` if it defines one, the children of an nn.Sequential, else itself."""
    if callable(getattr(model, "stages", None)):
        return list(model.stages())
    if isinstance(model, nn.Sequential):
        return list(model)
    return [model]


def first_item(batch: Batch) -> torch.Tensor:
    return batch[0]


class StagedObjective(Objective):
    """`loss_fn(model(inputs(batch)), batch)` for a model made of ordered stages.

    Custom models get feature reuse by being an `nn.Sequential` or by defining `stages()` that
    returns modules whose composition is the forward; each stage maps one tensor to one tensor. A
    parameter belongs to the first stage that reads it (tied weights, a plain attribute, a
    functional call: found by running the stages once at the first query), so a query perturbing it
    reruns every stage from there on. The engine runs the composition, never `forward`: the first
    query also checks that they agree, and keep agreeing when parameters move (`stage_check`;
    ConfigError otherwise), with the random number generators forked so a dropout-style forward
    passes too; `check_stages=False` skips that check for a forward whose randomness the stages
    cannot replay.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[torch.Tensor, Batch], torch.Tensor],
        inputs: Callable[[Batch], torch.Tensor] = first_item,
        trainable: Callable[[str, nn.Parameter], bool] | None = None,
        check_stages: bool = True,
    ):
        self.stages: Sequence[nn.Module] = model_stages(model)
        self.num_stages = len(self.stages)
        self.loss_fn = loss_fn
        self.inputs = inputs
        self._suffix_cost: list[float] | None = None
        self._unresolved = True
        self._unchecked = check_stages and not _composes_by_construction(model, self.stages)
        self.readers: dict[int, set[nn.Module]] = {}  # parameter id -> innermost modules reading it
        self.writes_input = [False] * self.num_stages  # stages that modify their input in place
        # Memory format of every 4-D stage input (None: as it comes). An evaluator that runs its
        # queries in NHWC sets it, so the base query rounds as they do (see BatchedEvaluator.base).
        self.stage_format: torch.memory_format | None = None
        super().__init__(model, trainable)

    def _stage_of_param(self, p: nn.Parameter) -> int:
        return 0  # until the first query finds the stages that read it (0 is always exact)

    def block_stages(self) -> list[int]:
        """Before the first query, the stage that registers each tensor: what a cost report made before
        training can say (the first query traces the stages and moves a tensor earlier only if an earlier
        stage also reads it); after it, the stages the queries really restart from."""
        if not self._unresolved:
            return super().block_stages()
        registered = registering_stages(self.stages)
        return [registered.get(id(b.param), 0) for b in self.coords.blocks]

    def stage_cost(self, stage: int) -> float:
        return 1.0 if self._suffix_cost is None else self._suffix_cost[stage]

    def _compose(self, h: torch.Tensor, start: int = 0) -> torch.Tensor:
        for i in range(start, self.num_stages):
            h = self._stage(i, h)
        return h

    def _stage(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Stage i on h; on a copy if the stage writes into its input, so a cached input stays intact."""
        h = self._formatted(h)
        return self.stages[i](h.clone() if self.writes_input[i] else h)

    def _formatted(self, h: torch.Tensor) -> torch.Tensor:
        if self.stage_format is None or h.dim() != 4:
            return h
        return h.contiguous(memory_format=self.stage_format)

    def _run(self, stage: int, h: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.loss_fn(self._compose(h, stage), batch)

    def _loss(self, batch: Batch) -> torch.Tensor:
        self._prepare(batch)
        return self._run(0, self.inputs(batch), batch)

    def _prepare(self, batch: Batch) -> None:
        """Once, at the first query: who owns each parameter, then whether the stages are forward."""
        if self._unresolved:
            self._unresolved = False
            params = [b.param for b in self.coords.blocks]
            with frozen_running_stats(self.module):
                reads = forked_rng(batch, lambda: record_reads(self.stages, self.inputs(batch), params))
            self.readers, self.writes_input = reads.modules, reads.writes_input
            self.coords.restage(owners(self.coords.blocks, self.stages, reads, self._describe()))
        if self._unchecked:
            self._unchecked = False
            self._check_stages(batch)

    def _describe(self) -> str:
        return f"{self.num_stages} stages of {type(self.module).__name__}"

    def _check_stages(self, batch: Batch) -> None:
        """The stage composition must reproduce `forward` (the model the user means to train)."""

        def refuse(why: str) -> ConfigError:
            return ConfigError(
                f"the {self._describe()} do not compose to its forward: {why}; make stages() (or the "
                "nn.Sequential children) compute exactly forward, e.g. keep a skip connection inside one "
                "stage, or pass check_stages=False if forward is random in a way the stages cannot replay"
            )

        def forward() -> Any:
            x = self.inputs(batch)
            return self.module(x.clone() if self.writes_input[0] else x)

        with torch.no_grad(), frozen_running_stats(self.module):
            check_composition(
                lambda: forked_rng(batch, forward),
                lambda: forked_rng(batch, lambda: self._with_inputs(batch)),
                self.coords.blocks,
                refuse,
            )

    def forward_cached(self, batch: Batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self._prepare(batch)
        if self._suffix_cost is None:
            self._suffix_cost = self._measure_suffix_cost(self.inputs(batch))
        self.counter.add(1, 1.0)
        out, cache = self._with_inputs(batch)
        return self.loss_fn(out, batch), cache

    def _with_inputs(self, batch: Batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The composed output and every stage's input (what feature reuse caches)."""
        h, inputs = self.inputs(batch), []
        for i in range(self.num_stages):
            h = self._formatted(h)
            inputs.append(h)
            h = self._stage(i, h)
        return h, inputs

    def loss_from(self, stage: int, cache: list[torch.Tensor], batch: Batch) -> torch.Tensor:
        self.counter.add(1, self.stage_cost(stage))
        return self._run(stage, cache[stage], batch)

    def _measure_suffix_cost(self, h: torch.Tensor) -> list[float]:
        """FLOPs of stages s.. as a fraction of the whole forward (uniform if nothing is counted)."""
        flops = []
        with torch.no_grad(), frozen_running_stats(self.module):
            for i in range(self.num_stages):
                with FlopCounterMode(display=False) as fc:
                    h = self._stage(i, h)
                flops.append(float(fc.get_total_flops()))
        total = sum(flops)
        if total <= 0:
            flops, total = [1.0] * len(flops), float(len(flops))
        return [sum(flops[i:]) / total for i in range(len(flops))]


def _composes_by_construction(model: nn.Module, stages: Sequence[nn.Module]) -> bool:
    """A single stage that is the model, or an nn.Sequential's own forward over its children."""
    if len(stages) == 1 and stages[0] is model:
        return True
    plain = isinstance(model, nn.Sequential) and type(model).forward is nn.Sequential.forward
    return plain and not callable(getattr(model, "stages", None))


def forked_rng(batch: Batch, fn: Callable[[], Any]) -> Any:
    """fn() with every random generator (CPU and the batch's GPUs) restored afterwards, so two calls
    draw the same numbers and training's random stream is untouched."""
    devices = sorted({t.device.index or 0 for t in _tensors(batch) if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        return fn()


def _tensors(batch: Batch) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, (list, tuple)):
        return [t for item in batch for t in _tensors(item)]
    if isinstance(batch, dict):
        return [t for item in batch.values() for t in _tensors(item)]
    return []
