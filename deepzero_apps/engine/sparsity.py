"""Sparse gradients, DeepZero style: which coordinates a CGE step estimates, and the LPR artifact.

The model stays dense; only the gradient is sparse. Each epoch interval, every scored tensor gets a
fresh uniformly random subset of its coordinates, sized by its layer-wise pruning ratio (LPR, from
`pruning`); the trainer passes `sampler.coords(epoch)` as `coords=` to the estimator. The subset is a
pure function of (seed, epoch // mask_interval), so a resumed run redraws the same sets;
mask_interval=None keeps the first set for the whole run (a fixed mask, the no-resampling ablation).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from torch import nn

from ..checkpoint import atomic_write_text
from .coords import CoordinateView
from .pruning import prunable_weights

Scheme = Literal["forward", "central"]
REQUIRED_META = ("method", "sparsity", "ordering", "model", "seed")


def _queries(num_coords: int, scheme: Scheme) -> int:
    """Queries of one CGE step over `num_coords` coordinates, the base query included."""
    if scheme not in ("forward", "central"):
        raise ValueError(f"unknown difference scheme '{scheme}'; choose forward or central")
    return (2 if scheme == "central" else 1) * num_coords + 1


class DenseSampler:
    """Every coordinate every step: `coords` returns None, so a trainer treats dense and sparse alike."""

    def __init__(self, view: CoordinateView):
        self.view = view
        self.num_coords = view.dim

    def coords(self, epoch: int) -> None:
        return None

    def queries_per_step(self, scheme: Scheme = "forward") -> int:
        return _queries(self.num_coords, scheme)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "dense"}


class SparseCoordinateSampler:
    """Random per-tensor coordinate subsets sized by an LPR, redrawn every `mask_interval` epochs.

    A tensor with pruning ratio r contributes round((1 - r) * numel) coordinates. Tensors without a
    ratio (biases, BatchNorm) are estimated densely if `dense_unscored`, else not at all.
    mask_interval=5 follows the official code; 1 is Algorithm 1 of the paper (a new set every epoch);
    None never redraws (one fixed set, drawn as the first interval's).
    """

    def __init__(
        self,
        view: CoordinateView,
        ratios: Mapping[str, float],
        *,
        mask_interval: int | None = 5,
        seed: int = 0,
        dense_unscored: bool = True,
    ):
        names = {b.name for b in view.blocks}
        unknown = sorted(set(ratios) - names)
        if unknown:
            raise ValueError(f"ratios name tensors that are not trainable coordinates: {', '.join(unknown)}")
        bad = {n: r for n, r in ratios.items() if not 0.0 <= r <= 1.0}
        if bad:
            raise ValueError(f"pruning ratios must be in [0, 1], got {bad}")
        if mask_interval is not None and mask_interval < 1:
            raise ValueError(f"mask_interval must be >= 1, got {mask_interval}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.view = view
        self.ratios = {n: float(r) for n, r in ratios.items()}
        self.mask_interval, self.seed, self.dense_unscored = (
            None if mask_interval is None else int(mask_interval),
            int(seed),
            bool(dense_unscored),
        )
        self.sizes: dict[str, int] = {
            b.name: round((1.0 - self.ratios[b.name]) * b.numel)
            if b.name in self.ratios
            else (b.numel if dense_unscored else 0)
            for b in view.blocks
        }
        self.num_coords = sum(self.sizes.values())
        self._cached: tuple[int, torch.Tensor] | None = None

    def coords(self, epoch: int) -> torch.Tensor:
        """Sorted global coordinate indices to estimate during `epoch`."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        period = 0 if self.mask_interval is None else epoch // self.mask_interval
        if self._cached is None or self._cached[0] != period:
            self._cached = (period, self._draw(period))
        return self._cached[1].clone()

    def _draw(self, period: int) -> torch.Tensor:
        # A seed mixed from (seed, period) only: no state carried between intervals, so resumes replay.
        mixed = int(np.random.SeedSequence([self.seed, period]).generate_state(1, np.uint64)[0])
        gen = torch.Generator().manual_seed(mixed)
        parts = []
        for b in self.view.blocks:
            k = self.sizes[b.name]
            if k == b.numel:
                local = torch.arange(b.numel)
            else:
                local = torch.randperm(b.numel, generator=gen)[:k].sort().values
            parts.append(local + b.start)
        return torch.cat(parts)

    def queries_per_step(self, scheme: Scheme = "forward") -> int:
        """Queries of one sparse CGE step: one per sampled coordinate (two if central) plus the base."""
        return _queries(self.num_coords, scheme)

    def state_dict(self) -> dict[str, Any]:
        """The full configuration: the sets themselves are recomputed, never stored."""
        return {
            "kind": "sparse",
            "ratios": dict(self.ratios),
            "mask_interval": self.mask_interval,
            "seed": self.seed,
            "dense_unscored": self.dense_unscored,
        }

    @classmethod
    def from_state_dict(cls, view: CoordinateView, state: Mapping[str, Any]) -> SparseCoordinateSampler:
        if state.get("kind") != "sparse":
            raise ValueError(f"not a sparse sampler state (kind={state.get('kind')!r})")
        return cls(
            view,
            state["ratios"],
            mask_interval=state["mask_interval"],
            seed=state["seed"],
            dense_unscored=state["dense_unscored"],
        )


def _format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "json"
    if suffix in (".yaml", ".yml"):
        return "yaml"
    raise ValueError(f"LPR file '{path}' must end in .json, .yaml or .yml")


def save_ratios(path: str | Path, ratios: Mapping[str, float], meta: Mapping[str, Any]) -> Path:
    """Write an LPR as readable JSON or YAML (by suffix): `meta` (how it was made) and `ratios`."""
    path = Path(path)
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"LPR meta lacks {', '.join(missing)} (needs {', '.join(REQUIRED_META)})")
    doc = {"meta": dict(meta), "ratios": {n: float(r) for n, r in ratios.items()}}
    text = (
        json.dumps(doc, indent=2) + "\n"
        if _format(path) == "json"
        else yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)
    )
    atomic_write_text(path, text)
    return path


def load_ratios(
    path: str | Path, model: nn.Module | None = None, only: Collection[str] | None = None
) -> tuple[dict[str, float], dict[str, Any]]:
    """Read an LPR written by `save_ratios`; with `model`, check it names exactly its conv/linear weights
    (those in `only`, a trainable subset's names, when given)."""
    path = Path(path)
    text = path.read_text()
    doc = json.loads(text) if _format(path) == "json" else yaml.safe_load(text)
    if not isinstance(doc, dict) or not isinstance(doc.get("ratios"), dict):
        raise ValueError(f"LPR file '{path}' has no 'ratios' mapping")
    ratios = {str(n): float(r) for n, r in doc["ratios"].items()}
    meta = dict(doc.get("meta") or {})
    if model is not None:
        expected = set(prunable_weights(model, only))
        unknown, missing = sorted(set(ratios) - expected), sorted(expected - set(ratios))
        if unknown or missing:
            raise ValueError(
                f"LPR file '{path}' (model {meta.get('model')!r}) does not match {type(model).__name__}: "
                f"unknown layers [{', '.join(unknown)}], missing layers [{', '.join(missing)}]"
            )
    return ratios, meta
