"""Data-parallel-free coordinate sharding across processes (torchrun / torch.distributed).

Every rank holds the whole model and the same batch, runs the same base query, evaluates only its
shard of the coordinates, and an all-reduce (a sum of each coordinate's loss with exact zeros from
the other ranks, hence exact) gives every rank all the losses, so all ranks write the same gradient
and take the same optimizer step. Shards are balanced by cost measured at run time: each rank times
its parameter tensors, the timings are all-reduced, and rank 0 cuts the coordinate list into pieces
of equal predicted time and broadcasts the cuts. The official DeepZero code instead balances one
coordinate per RPC call with a hard-coded ResNet-20 cost table.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
import torch.distributed as dist

from .coords import Block
from .evaluators import EVALUATORS, ReferenceEvaluator, make_evaluator
from .objective import Batch, Objective


def init_distributed(backend: str | None = None) -> torch.device:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT);
    gloo on CPU, NCCL on CUDA. A single process (no WORLD_SIZE or 1) initializes nothing.
    Returns the device this rank should use."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"))
    return device


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if _active():
        dist.barrier()


def _comm_device() -> torch.device:
    """NCCL only moves CUDA tensors; gloo takes CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class ShardedEvaluator(ReferenceEvaluator):
    """Runs `inner`'s coordinate queries split over the ranks; single process: just `inner`.

    Costs are kept per parameter tensor (seconds per coordinate, averaged over steps); tensors not
    yet timed are predicted from the objective's stage_cost FLOP fractions, scaled to the measured
    ones. `query` (RGE) is not sharded: every rank runs it.
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
        view = objective.coords
        timing = torch.zeros(2, len(view.blocks), dtype=torch.float64)  # seconds, coordinates
        index = {b.name: i for i, b in enumerate(view.blocks)}
        for block, positions, local in view.split(coords[mine]):
            t0 = time.perf_counter()
            losses[mine[positions]] = self.inner.coordinate_losses(
                objective, batch, context, local + block.start, step
            )
            timing[0, index[block.name]] += time.perf_counter() - t0
            timing[1, index[block.name]] += len(local)
        self.last_busy_seconds = float(timing[0].sum())
        losses, timing = losses.to(device), timing.to(device)
        dist.all_reduce(losses)
        dist.all_reduce(timing)
        self._record(view.blocks, timing.cpu())
        return losses.cpu()

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


EVALUATORS["sharded"] = (
    ShardedEvaluator  # registered here: evaluators.py importing this module would be circular
)
