"""A flat coordinate space over the trainable tensors.

Every estimator, sampler and shard speaks in global coordinate indices; this view is the one place
that maps them back to (tensor, flat offset) and knows which model stage owns each tensor.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn


@dataclass(frozen=True)
class Block:
    """One trainable tensor seen as the coordinate range [start, start + numel)."""

    name: str
    param: nn.Parameter
    start: int
    stage: int

    @property
    def numel(self) -> int:
        return self.param.numel()

    @property
    def stop(self) -> int:
        return self.start + self.numel

    @property
    def flat(self) -> torch.Tensor:
        """The parameter's storage as a 1-D view (writes go to the model)."""
        return self.param.data.view(-1)


class CoordinateView:
    """Addresses, perturbs and writes gradients for coordinates of a list of parameters."""

    def __init__(self, named_params: Sequence[tuple[str, nn.Parameter]], stages: Sequence[int] | None = None):
        stages = list(stages) if stages is not None else [0] * len(named_params)
        if len(stages) != len(named_params):
            raise ValueError(f"got {len(stages)} stage ids for {len(named_params)} parameters")
        self.blocks: list[Block] = []
        start = 0
        for (name, p), stage in zip(named_params, stages):
            if not p.is_contiguous():
                raise ValueError(f"parameter '{name}' is not contiguous; coordinates need a flat view")
            self.blocks.append(Block(name, p, start, stage))
            start += p.numel()
        self.dim = start
        self._starts = torch.tensor([b.start for b in self.blocks], dtype=torch.long)

    def __len__(self) -> int:
        return self.dim

    def block(self, name: str) -> Block:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(f"no trainable parameter named '{name}'")

    def split(self, coords: torch.Tensor) -> Iterator[tuple[Block, torch.Tensor, torch.Tensor]]:
        """Group global coordinates by tensor: yields (block, positions in `coords`, local flat indices)."""
        coords = coords.to("cpu", torch.long)
        if coords.numel() and (coords.min() < 0 or coords.max() >= self.dim):
            raise IndexError(f"coordinate out of range [0, {self.dim})")
        owner = torch.searchsorted(self._starts, coords, right=True) - 1
        for i in owner.unique().tolist():
            positions = (owner == i).nonzero().flatten()
            yield self.blocks[i], positions, coords[positions] - self.blocks[i].start

    def restage(self, stages: Sequence[int]) -> None:
        """Set the owning stage of every block (in order), once the stages that read each are known."""
        if len(stages) != len(self.blocks):
            raise ValueError(f"got {len(stages)} stage ids for {len(self.blocks)} parameters")
        self.blocks = [replace(b, stage=s) for b, s in zip(self.blocks, stages)]

    def stage_of(self, coords: torch.Tensor) -> torch.Tensor:
        """Stage index owning each coordinate."""
        owner = torch.searchsorted(self._starts, coords.to("cpu", torch.long), right=True) - 1
        return torch.tensor([b.stage for b in self.blocks], dtype=torch.long)[owner]

    def flatten(self) -> torch.Tensor:
        """Current values of all coordinates as one vector (a copy)."""
        return torch.cat([b.flat for b in self.blocks]).clone()

    def assign(self, values: torch.Tensor) -> None:
        """Write a full coordinate vector back into the parameters."""
        for b in self.blocks:
            b.flat.copy_(values[b.start : b.stop])

    def write_grad(self, values: torch.Tensor, coords: torch.Tensor | None = None) -> None:
        """Set every parameter's `.grad`: `values` at `coords` (all coordinates if None), zero elsewhere."""
        if coords is None:
            for b in self.blocks:
                b.param.grad = values[b.start : b.stop].to(b.param.dtype).view_as(b.param).clone()
            return
        for b in self.blocks:
            b.param.grad = torch.zeros_like(b.param)
        for b, positions, local in self.split(coords):
            b.param.grad.view(-1)[local.to(b.param.device)] = values[positions].to(b.param)

    def numel_per_stage(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for b in self.blocks:
            out[b.stage] = out.get(b.stage, 0) + b.numel
        return out
