"""Data-parallel-free coordinate sharding across processes (torchrun / torch.distributed).

Every rank holds the whole model and the same batch, runs the same base query, evaluates only its
shard of the coordinates, and an all-reduce (a sum of each coordinate's loss with exact zeros from
the other ranks, hence exact) gives every rank all the losses, so all ranks write the same gradient
and take the same optimizer step. Shards are balanced by cost measured at run time: each rank times
its parameter tensors, the timings are all-reduced, and rank 0 cuts the coordinate list into pieces
of equal predicted time and broadcasts the cuts. The official DeepZero code instead balances one
coordinate per RPC call with a hard-coded ResNet-20 cost table.

Joining is bounded (`timeout`) and survives torchrun's elastic restarts: torchrun's agent keeps one
key-value store for the whole job, so each attempt's process group lives under its own prefix there
(torch's own env:// join would find the dead attempt's addresses), and the job-wide keys let a
restarted attempt find what the first one decided (`job_get`, `job_set`).
"""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..errors import RunError, one_line
from .coords import Block
from .evaluators import EVALUATORS, ReferenceEvaluator, make_evaluator
from .objective import Batch, Objective
from .queries import QueryCounter
from .stacked import StackedObjective


def launched_by_torchrun() -> bool:
    """True in a process that torchrun (or any launcher setting WORLD_SIZE > 1) started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def restart_count() -> int:
    """How many times torchrun has restarted this worker group (0: the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


_job_store: dist.Store | None = None  # torchrun's agent store: outlives this attempt's processes


def init_distributed(
    device: str | torch.device | None = None, backend: str | None = None, timeout: float | None = None
) -> torch.device:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT);
    gloo on CPU, NCCL on CUDA. `device` is the run's device ("cpu", "cuda"; None: CUDA when
    available); a CUDA rank uses GPU LOCAL_RANK. A single process (no WORLD_SIZE or 1) initializes
    nothing. `timeout` (seconds; None: torch's default) bounds the join and every collective after
    it: a rank that cannot reach MASTER_ADDR:MASTER_PORT, or a group that does not fill, is a
    one-line RunError. Returns the device this rank should use."""
    global _job_store
    local = int(os.environ.get("LOCAL_RANK", "0"))
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device("cuda", local) if kind == "cuda" else torch.device(kind)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if launched_by_torchrun() and not dist.is_initialized():
        wait = timedelta(seconds=timeout) if timeout is not None else timedelta(minutes=30)
        me, world = int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        try:
            store, _, _ = next(dist.rendezvous("env://", timeout=wait))
            if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
                _job_store = store
            attempt = dist.PrefixStore(f"deepzero_apps/attempt_{restart_count()}", store)
            dist.init_process_group(
                backend or ("nccl" if device.type == "cuda" else "gloo"),
                store=attempt, rank=me, world_size=world, timeout=wait,
            )
        except (dist.DistError, RuntimeError, ValueError) as exc:
            raise RunError(
                f"rank {me} of {world}: the process group at {where} did not form within "
                f"{wait.total_seconds():g} s ({one_line(exc)[:300]}); a rank cannot reach it or was not "
                "started (dist_timeout bounds the wait)"
            ) from exc
    return device


def job_get(key: str) -> str | None:
    """What an earlier torchrun attempt of this job stored under `key` (None: nothing, or no agent
    store), rank 0's answer on every rank."""
    answer: list[str | None] = [None]
    if is_main() and _job_store is not None and _job_store.check([f"deepzero_apps/job/{key}"]):
        answer = [_job_store.get(f"deepzero_apps/job/{key}").decode()]
    if _active():
        dist.broadcast_object_list(answer, src=0)
    return answer[0]


def job_set(key: str, value: str) -> None:
    """Keep `value` under `key` for later torchrun attempts of this job (rank 0; a no-op without the
    agent store)."""
    if is_main() and _job_store is not None:
        _job_store.set(f"deepzero_apps/job/{key}", value)


T = TypeVar("T")


def on_rank0(fn: Callable[[], T]) -> T:
    """`fn()` run by rank 0 alone, its result given to every rank; if it raises, every rank raises it
    (so the others stop with rank 0's reason instead of waiting at the next collective)."""
    if not _active():
        return fn()
    outcome: list[Any] = [None]
    error: Exception | None = None
    if is_main():
        try:
            outcome = [(True, fn())]
        except Exception as exc:  # handed to the other ranks, then raised here too
            error = exc
            try:
                outcome = [(False, pickle.loads(pickle.dumps(exc)))]
            except Exception:  # an exception that does not pickle travels as its one line
                outcome = [(False, RunError(one_line(exc)))]
    dist.broadcast_object_list(outcome, src=0)
    ok, value = outcome[0]
    if error is not None:
        raise error
    if not ok:
        raise value
    return value


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    return rank() == 0


def gather_all(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank; `[obj]` in a single process."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if _active():
        dist.barrier()


def _comm_device() -> torch.device:
    """NCCL only moves CUDA tensors; gloo takes CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over the ranks, on t's device (a copy; `t` itself when single-process)."""
    if not _active():
        return t
    out = t.to(_comm_device(), copy=True)
    dist.all_reduce(out)
    return out.to(t.device)


def share_query_counts(counter: QueryCounter, before: QueryCounter) -> None:
    """Make the queries this rank counted since `before` the sum over all ranks, so every rank's
    counter (and a query budget's stop decision) equals the single-process one."""
    spent = counter.since(before)
    mine = torch.tensor([spent.queries, spent.forward_equivalents], dtype=torch.float64)
    total = all_reduce_sum(mine)
    counter.add(int(total[0].item()) - spent.queries, float(total[1] - mine[1]))


class ShardedEvaluator(ReferenceEvaluator):
    """Runs `inner`'s coordinate queries split over the ranks; single process: just `inner`.

    Costs are kept per parameter tensor (seconds per coordinate, averaged over steps); tensors not
    yet timed are predicted from the objective's stage_cost FLOP fractions, scaled to the measured
    ones (a `StackedObjective`'s queries all cost the same: equal shares, one stacked call per rank).
    RGE's directions are dealt round-robin (rank r evaluates directions r, r + world, ...).
    Every rank's query counter ends up with the total over all ranks. A single `query` is not
    sharded.
    """

    name = "sharded"

    def __init__(self, inner: str | ReferenceEvaluator = "batched"):
        self.inner = make_evaluator(inner)
        self.seconds: dict[str, float] = {}  # measured seconds per coordinate, per parameter tensor
        self.last_busy_seconds = 0.0  # this rank's time on its own shard in the last call (balance check)

    def base(self, objective: Objective, batch: Batch) -> tuple[torch.Tensor, Any]:
        return self.inner.base(objective, batch)

    def query(self, objective: Objective, batch: Batch, context: Any, stage: int) -> torch.Tensor:
        return self.inner.query(objective, batch, context, stage)

    def coordinate_losses(
        self, objective: Objective, batch: Batch, context: Any, coords: torch.Tensor, step: float
    ) -> torch.Tensor:
        world = world_size()
        if world == 1 or not len(coords):
            return self.inner.coordinate_losses(objective, batch, context, coords, step)
        device = _comm_device()
        order = torch.argsort(coords.to("cpu", torch.long), stable=True)  # tensor by tensor
        cuts = self.cuts(objective, coords[order], world).to(device)
        dist.broadcast(cuts, src=0)
        lo, hi = cuts[rank()].item(), cuts[rank() + 1].item()
        mine = order[lo:hi]
        losses = torch.zeros(len(coords), dtype=torch.float64)
        view, before = objective.coords, objective.counter.snapshot()
        timing = torch.zeros(2, len(view.blocks), dtype=torch.float64)  # seconds, coordinates
        index = {b.name: i for i, b in enumerate(view.blocks)}
        if isinstance(objective, StackedObjective):  # every query runs it all: equal shares, one call
            t0 = time.perf_counter()
            losses[mine] = self.inner.coordinate_losses(objective, batch, context, coords[mine], step)
            timing[0, 0] = time.perf_counter() - t0
        else:
            for block, positions, local in view.split(coords[mine]):
                t0 = time.perf_counter()
                losses[mine[positions]] = self.inner.coordinate_losses(
                    objective, batch, context, local + block.start, step
                )
                timing[0, index[block.name]] += time.perf_counter() - t0
                timing[1, index[block.name]] += len(local)
        self.last_busy_seconds = float(timing[0].sum())
        losses, timing = all_reduce_sum(losses), all_reduce_sum(timing)
        self._record(view.blocks, timing)
        share_query_counts(objective.counter, before)
        return losses

    def direction_losses(
        self,
        objective: Objective,
        batch: Batch,
        context: Any,
        directions: Sequence[torch.Tensor],
        coords: torch.Tensor | None,
        step: float,
        indices: Sequence[int] | None = None,
    ) -> torch.Tensor:
        todo = list(range(len(directions)) if indices is None else indices)
        world = world_size()
        if world == 1:
            return self.inner.direction_losses(objective, batch, context, directions, coords, step, todo)
        before = objective.counter.snapshot()
        mine = list(range(rank(), len(todo), world))
        losses = torch.zeros(len(todo), dtype=torch.float64)  # exact: each loss is one rank's value plus zeros
        losses[mine] = self.inner.direction_losses(
            objective, batch, context, directions, coords, step, [todo[n] for n in mine]
        )
        losses = all_reduce_sum(losses)
        share_query_counts(objective.counter, before)
        return losses

    def _record(self, blocks: list[Block], timing: torch.Tensor) -> None:
        for b, (sec, n) in zip(blocks, timing.t().tolist()):
            if n > 0:
                per = sec / n
                self.seconds[b.name] = (
                    per if b.name not in self.seconds else 0.5 * (self.seconds[b.name] + per)
                )

    def cost(self, objective: Objective) -> torch.Tensor:
        """Predicted seconds per coordinate for every parameter tensor."""
        blocks = objective.coords.blocks
        prior = torch.tensor([objective.stage_cost(b.stage) for b in blocks], dtype=torch.float64)
        timed = [i for i, b in enumerate(blocks) if b.name in self.seconds]
        if not timed:
            return prior
        measured = torch.tensor([self.seconds[blocks[i].name] for i in timed], dtype=torch.float64)
        numel = torch.tensor([blocks[i].numel for i in timed], dtype=torch.float64)
        scale = (measured * numel).sum() / (prior[timed] * numel).sum()
        out = prior * scale
        out[timed] = measured
        return out

    def cuts(self, objective: Objective, sorted_coords: torch.Tensor, world: int) -> torch.Tensor:
        """Boundaries (world + 1 indices into the sorted coordinates) of equal predicted time."""
        starts = torch.tensor([b.start for b in objective.coords.blocks])
        owner = torch.searchsorted(starts, sorted_coords.to("cpu", torch.long), right=True) - 1
        total = torch.cumsum(self.cost(objective)[owner], 0)
        targets = total[-1] * torch.arange(1, world, dtype=torch.float64) / world
        inner = torch.searchsorted(total, targets)
        return torch.cat([torch.tensor([0]), inner, torch.tensor([len(sorted_coords)])]).to(torch.long)


def shard_over_ranks(estimator: Any) -> None:
    """Under torchrun, split an estimator's queries over the ranks: its evaluator, unless already
    sharded, is wrapped in ShardedEvaluator (CGE's coordinates, RGE's directions).
    A single process keeps the estimator as it is."""
    ev = getattr(estimator, "evaluator", None)
    if world_size() > 1 and isinstance(ev, ReferenceEvaluator) and not isinstance(ev, ShardedEvaluator):
        estimator.evaluator = ShardedEvaluator(ev)


EVALUATORS["sharded"] = (
    ShardedEvaluator  # registered here: evaluators.py importing this module would be circular
)
