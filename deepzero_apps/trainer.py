"""The training loop shared by every application: ZO or first-order steps, evaluation, logging,
crash-safe checkpoints and exact resume.

Randomness is a pure function of (seed, epoch, step): the epoch's data order, the estimator's
directions (seeded by the global step) and the sparse coordinate sets (seeded by the epoch), so a
run killed at any point and resumed from its last checkpoint ends bit-identical to one that never
stopped (on CPU). RNG states are checkpointed too, for data augmentation.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from .checkpoint import load_checkpoint, remove_stale_temps, rng_state, save_checkpoint, set_rng_state
from .engine import Objective
from .engine.distributed import all_reduce_sum, barrier, is_main, shard_over_ranks
from .errors import RunError
from .plotting import plot_learning_curve, read_metrics
from .schedules import build_scheduler

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CURVE = "learning_curve.png"


class NonFiniteError(RunError):
    """A step produced a NaN/inf loss or gradient (the run stops; the last checkpoint stays good)."""


class Estimator(Protocol):
    def estimate(self, objective: Objective, batch: Any, coords: torch.Tensor | None = None, step: int = 0) -> float: ...


class Sampler(Protocol):
    def coords(self, epoch: int) -> torch.Tensor | None: ...


@dataclass
class TrainerConfig:
    epochs: int
    batch_size: int
    warmup_epochs: float = 0.0
    seed: int = 0
    query_budget: int | None = None
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints; 0 = at epoch ends only
    log_every: int = 10
    on_nonfinite: str = "stop"  # or "skip"
    resume: bool = False
    num_workers: int = 0
    drop_last: bool = True
    progress: bool = True


def to_device(batch: Any, device: torch.device | str) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    return batch


class Trainer:
    def __init__(
        self,
        objective: Objective,
        estimator: Estimator,
        optimizer: torch.optim.Optimizer,
        train_set: Dataset,
        evaluate: Callable[[], dict[str, float]],
        out_dir: str | Path,
        config: TrainerConfig,
        scheduler_factory: Callable[..., Any] | None = None,
        sampler: Sampler | None = None,
        device: str | torch.device = "cpu",
        extra_state: dict[str, Any] | None = None,
        title: str = "",
        sinks: Sequence[Callable[[dict], None]] = (),
    ):
        self.objective, self.estimator, self.optimizer = objective, estimator, optimizer
        self.train_set, self.evaluate, self.cfg = train_set, evaluate, config
        self.out_dir, self.sampler, self.device, self.title = Path(out_dir), sampler, device, title
        self.extra_state = extra_state or {}
        self.sinks = tuple(sinks)  # metric loggers beside metrics.jsonl (deepzero_apps.loggers)
        n, b = len(train_set), config.batch_size
        self.steps_per_epoch = n // b if (config.drop_last and n >= b) else math.ceil(n / b)
        total = self.steps_per_epoch * config.epochs
        self.scheduler = build_scheduler(
            scheduler_factory, optimizer, total, round(config.warmup_epochs * self.steps_per_epoch)
        )
        self.epoch = self.step_in_epoch = self.global_step = 0
        self.elapsed = 0.0
        self.main = is_main()
        shard_over_ranks(estimator)

    # ---- data --------------------------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.train_set), generator=g)

    def _batches(self, epoch: int, first_step: int) -> Sequence[Any] | DataLoader:
        b = self.cfg.batch_size
        idx = self._epoch_order(epoch)[first_step * b : self.steps_per_epoch * b]
        tensors = getattr(self.train_set, "tensors", None)
        if tensors is not None:  # in-memory data: index directly, no loader overhead
            return [tuple(t[idx[i : i + b]] for t in tensors) for i in range(0, len(idx), b)]
        return DataLoader(Subset(self.train_set, idx.tolist()), batch_size=b, num_workers=self.cfg.num_workers)

    # ---- state -------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT

    def state_dict(self) -> dict:
        return {
            "model": self.objective.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "sampler": self.sampler.state_dict() if hasattr(self.sampler, "state_dict") else None,
            "queries": self.objective.counter.state_dict(),
            "extra": {k: v.state_dict() for k, v in self.extra_state.items()},
            "rng": rng_state(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "elapsed": self.elapsed,
        }

    def load_state_dict(self, state: dict) -> None:
        self.objective.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.objective.counter.load_state_dict(state["queries"])
        for k, v in self.extra_state.items():
            v.load_state_dict(state["extra"][k])
        set_rng_state(state["rng"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.elapsed = state["global_step"], state["elapsed"]

    def _save(self) -> None:
        if self.main:
            save_checkpoint(self.checkpoint_path, self.state_dict())

    def _restore_or_start(self) -> None:
        exists = self.checkpoint_path.exists()
        barrier()  # every rank has looked before rank 0 can write a first checkpoint
        if exists and not self.cfg.resume:
            raise FileExistsError(
                f"{self.checkpoint_path} already exists; pass resume=true to continue it or pick another output dir"
            )
        if self.main:
            remove_stale_temps(self.checkpoint_path)
        if exists:
            self.load_state_dict(load_checkpoint(self.checkpoint_path, map_location=self.device))
            kept = [r for r in read_metrics(self.out_dir / METRICS) if r["step"] <= self.global_step]
            if self.main:
                (self.out_dir / METRICS).write_text("".join(json.dumps(r) + "\n" for r in kept))
                print(f"resuming from {self.checkpoint_path} at epoch {self.epoch}, step {self.global_step}")
        else:
            torch.manual_seed(self.cfg.seed)

    # ---- loop --------------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        if self.main:
            with open(self.out_dir / METRICS, "a") as f:
                f.write(json.dumps(record) + "\n")
            for sink in self.sinks:
                sink(record)

    def _finite(self, loss: float) -> bool:
        return math.isfinite(loss) and all(
            torch.isfinite(b.param.grad).all() for b in self.objective.coords.blocks if b.param.grad is not None
        )

    def _train_step(self, batch: Any, coords: torch.Tensor | None) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.estimator.estimate(self.objective, batch, coords, step=self.global_step)
        if not self._finite(loss):
            if self.cfg.on_nonfinite != "skip":
                raise NonFiniteError(
                    f"non-finite loss or gradient at step {self.global_step} (epoch {self.epoch}, loss={loss}); "
                    f"last good checkpoint: {self.checkpoint_path}"
                )
            self.optimizer.zero_grad(set_to_none=True)
            print(f"skipping step {self.global_step}: non-finite loss or gradient (loss={loss})")
            self._log({"kind": "skipped", "step": self.global_step, "epoch": self.epoch, "loss": str(loss)})
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return loss

    def _budget_spent(self) -> bool:
        """Rank 0's count decides (all-reduced), so every rank stops at the same step."""
        budget = self.cfg.query_budget
        if budget is None:
            return False
        spent = self.main and self.objective.counter.queries >= budget
        return bool(all_reduce_sum(torch.tensor([float(spent)])).item() > 0)

    def fit(self) -> dict:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._restore_or_start()
        stopped = "epochs"
        while self.epoch < self.cfg.epochs and stopped == "epochs":
            stopped = self._run_epoch()
        if self.main:
            plot_learning_curve(self.out_dir / METRICS, self.out_dir / CURVE, self.title)
        last = [r for r in read_metrics(self.out_dir / METRICS) if r.get("kind") == "epoch"]
        return {
            "stopped": stopped,
            "epochs": self.epoch,
            "steps": self.global_step,
            "queries": self.objective.counter.queries,
            "forward_equivalents": self.objective.counter.forward_equivalents,
            "wall_s": self.elapsed,
            "eval": last[-1]["eval"] if last else self.evaluate(),
        }

    def _run_epoch(self) -> str:
        epoch, start = self.epoch, time.perf_counter()
        coords = self.sampler.coords(epoch) if self.sampler is not None else None
        before = self.objective.counter.snapshot()
        batches = self._batches(epoch, self.step_in_epoch)
        bar = tqdm(
            batches,
            total=self.steps_per_epoch,
            initial=self.step_in_epoch,
            desc=f"epoch {epoch + 1}/{self.cfg.epochs}",
            disable=not (self.main and self.cfg.progress),
            leave=False,
        )
        losses, stopped = [], "epochs"
        for batch in bar:
            loss = self._train_step(to_device(batch, self.device), coords)
            losses.append(loss)
            self.global_step += 1
            self.step_in_epoch += 1
            bar.set_postfix(loss=f"{loss:.4f}", queries=self.objective.counter.queries)
            if self.global_step % self.cfg.log_every == 0:
                self._log({"kind": "train", "step": self.global_step, "epoch": epoch, "loss": loss,
                           "lr": self.optimizer.param_groups[0]["lr"], "queries": self.objective.counter.queries})
            if self._budget_spent():
                stopped = "query budget"
                break
            if self.cfg.checkpoint_every and self.global_step % self.cfg.checkpoint_every == 0:
                self.elapsed += time.perf_counter() - start
                start = time.perf_counter()
                self._save()
        bar.close()
        if stopped == "epochs":
            self.epoch, self.step_in_epoch = epoch + 1, 0
        spent = self.objective.counter.since(before)
        metrics = self.evaluate() if self.main else {}
        self.elapsed += time.perf_counter() - start
        self._log({
            "kind": "epoch", "epoch": self.epoch, "step": self.global_step,
            "train_loss": sum(losses) / max(1, len(losses)), "eval": metrics,
            "queries": self.objective.counter.queries, "forward_equivalents": self.objective.counter.forward_equivalents,
            "queries_per_step": spent.queries / max(1, len(losses)), "wall_s": self.elapsed,
        })
        if self.main:
            summary = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
            where = f"epoch {epoch + 1}/{self.cfg.epochs}" + ("" if stopped == "epochs" else f" (stopped: {stopped})")
            tqdm.write(f"{where} loss={sum(losses) / max(1, len(losses)):.4f} {summary} "
                       f"queries={self.objective.counter.queries:,} wall={self.elapsed:.0f}s")
        self._save()
        return stopped
