"""The training loop shared by every application: ZO or first-order steps, evaluation, logging,
crash-safe checkpoints and exact resume.

Randomness is a pure function of (seed, epoch, step): the epoch's data order, the estimator's
directions (seeded by the global step) and the sparse coordinate sets (seeded by the epoch), so a
run killed at any point and resumed from its last checkpoint ends bit-identical to one that never
stopped (on CPU). RNG states, the batched evaluator's tuned chunk sizes, the epoch's running sums
and the number of metrics rows written are checkpointed too, so a resume also writes exactly the
metrics an uninterrupted run writes. Nothing non-finite is ever checkpointed, and the query
budget is checked before each step, from the step's cost known in advance.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from ..checkpoint import (
    interrupts_deferred,
    load_checkpoint,
    remove_stale_temps,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from ..engine import Objective
from ..engine.distributed import all_reduce_sum, barrier, is_main
from ..errors import ConfigError, RunError
from ..plotting import plot_learning_curve
from ..rundir import lock_run_dir
from ..schedules import build_scheduler
from .guards import NonFiniteError, grads_finite, state_finite, step_cost
from .metrics_log import METRICS, MetricsLog

CHECKPOINT = "checkpoint.pt"
CURVE = "learning_curve.png"


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
    eval_every: int = 0  # steps between held-out evaluations (learning curves); 0 = at epoch ends only
    on_nonfinite: str = "stop"  # or "skip": restore the pre-step state and go on
    max_skipped_fraction: float = 0.1  # skip fails the run once more than this fraction of all steps is skipped
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
        phase: str = "",
    ):
        self.objective, self.estimator, self.optimizer = objective, estimator, optimizer
        self.train_set, self.evaluate, self.cfg = train_set, evaluate, config
        self.out_dir, self.sampler, self.device, self.title = Path(out_dir), sampler, device, title
        self.phase = f"{phase}: " if phase else ""  # labels the epoch lines of an app with several trainings
        self.extra_state = extra_state or {}
        self.metrics = MetricsLog(self.out_dir / METRICS, sinks)
        n, b = len(train_set), config.batch_size
        self.steps_per_epoch = n // b if (config.drop_last and n >= b) else math.ceil(n / b)
        total = self.steps_per_epoch * config.epochs
        self.scheduler = build_scheduler(
            scheduler_factory, optimizer, total, round(config.warmup_epochs * self.steps_per_epoch)
        )
        self.epoch = self.step_in_epoch = self.global_step = 0
        self.elapsed = 0.0
        self.sums = _epoch_sums(objective.counter.queries)  # this epoch's loss sum, steps, queries at its start
        self.skipped = self.last_step_cost = 0
        self.saved_step: int | None = None  # global step of the checkpoint on disk (None: none written)
        self.stopped = ""  # "query budget" once the budget stopped the run
        self.last_eval: dict[str, float] | None = None
        self.main = is_main()

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

    @property
    def _evaluator(self) -> Any:
        """The estimator's evaluator, unwrapped from a ShardedEvaluator (whose inner one holds state)."""
        ev = getattr(self.estimator, "evaluator", None)
        return getattr(ev, "inner", ev)

    def state_dict(self) -> dict:
        ev = self._evaluator
        return {
            "model": self.objective.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "sampler": self.sampler.state_dict() if hasattr(self.sampler, "state_dict") else None,
            "evaluator": ev.state_dict() if hasattr(ev, "state_dict") else None,
            "queries": self.objective.counter.state_dict(),
            "extra": {k: v.state_dict() for k, v in self.extra_state.items()},
            "rng": rng_state(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "elapsed": self.elapsed,
            "epoch_sums": dict(self.sums),
            "skipped": self.skipped,
            "metrics_rows": self.metrics.rows,
            "last_step_cost": self.last_step_cost,
            "stopped": self.stopped,
            "last_eval": self.last_eval,
        }

    def load_state_dict(self, state: dict) -> None:
        self.objective.module.load_state_dict(state["model"])
        expected = [sorted(g) for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        if [sorted(g) for g in self.optimizer.param_groups] != expected:  # torch takes another optimizer's groups
            raise ValueError(f"optimizer state is not a {type(self.optimizer).__name__}'s")
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        ev = self._evaluator
        if state.get("evaluator") is not None and hasattr(ev, "load_state_dict"):
            ev.load_state_dict(state["evaluator"])
        self.objective.counter.load_state_dict(state["queries"])
        for k, v in self.extra_state.items():
            v.load_state_dict(state["extra"][k])
        set_rng_state(state["rng"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.elapsed = state["global_step"], state["elapsed"]
        self.sums = state.get("epoch_sums") or _epoch_sums(self.objective.counter.queries)
        self.skipped, self.last_step_cost = state.get("skipped", 0), state.get("last_step_cost", 0)
        self.stopped, self.last_eval = state.get("stopped", ""), state.get("last_eval")
        self.saved_step = self.global_step

    def _on_disk(self) -> str:
        """Which checkpoint a failure leaves, for its one-line message."""
        if self.saved_step is None:
            return "no checkpoint written"
        return f"last checkpoint on disk: {self.checkpoint_path} (step {self.saved_step})"

    def _save(self) -> None:
        if not self.main:
            return
        with interrupts_deferred():  # a Ctrl-C during the write stops the run with this checkpoint named
            try:
                save_checkpoint(self.checkpoint_path, self.state_dict())
            except OSError as exc:
                raise RunError(f"cannot write {self.checkpoint_path}: {exc.strerror or exc}; {self._on_disk()}") from exc
            self.saved_step = self.global_step

    def _restore_or_start(self) -> None:
        exists = self.checkpoint_path.exists()
        barrier()  # every rank has looked before rank 0 can write a first checkpoint
        if exists and not self.cfg.resume:
            raise FileExistsError(
                f"{self.checkpoint_path} already exists; pass resume=true to continue it or pick another output dir"
            )
        if self.main:
            remove_stale_temps(self.checkpoint_path)
            remove_stale_temps(self.out_dir / METRICS)
        if not exists:
            torch.manual_seed(self.cfg.seed)
            if self.main:  # a run killed before its first checkpoint left rows nothing covers
                (self.out_dir / METRICS).unlink(missing_ok=True)
            return
        state = load_checkpoint(self.checkpoint_path, map_location=self.device)
        try:
            self.load_state_dict(state)
        except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as exc:
            raise ConfigError(
                f"{self.checkpoint_path} does not belong to this run's model/optimizer/scheduler "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); "
                "pick another output dir or move it away"
            ) from exc
        if self.main:
            self.metrics.truncate(state.get("metrics_rows"), self.global_step)
            print(f"resuming from {self.checkpoint_path} at epoch {self.epoch}, step {self.global_step}")

    # ---- loop --------------------------------------------------------------------------------
    def _evaluate(self) -> dict[str, float]:
        """`evaluate`, with every submodule's train/eval mode as it was before: an evaluation that leaves
        the model in eval mode must not make the following steps train with frozen BatchNorm statistics
        (certify's classifier stage collapsed to chance that way from its second epoch)."""
        modes = [(m, m.training) for m in self.objective.module.modules()]
        try:
            return self.evaluate()
        finally:
            for m, training in modes:
                m.training = training

    def _log(self, record: dict) -> None:
        if self.main:
            self.metrics.append(record, self._on_disk)

    def _train_step(self, batch: Any, coords: torch.Tensor | None) -> float | None:
        """One step; returns its loss, or None if it was skipped (on_nonfinite=skip)."""
        skip = self.cfg.on_nonfinite == "skip"
        before = (
            ({k: v.clone() for k, v in self.objective.module.state_dict().items()},
             copy.deepcopy(self.optimizer.state_dict()))
            if skip else None
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.estimator.estimate(self.objective, batch, coords, step=self.global_step)
        what = "loss or gradient" if not grads_finite(self.objective, loss) else ""
        if not what:
            self.optimizer.step()
            what = "" if state_finite(self.objective.module, self.optimizer) else "parameter update"
        if what and not skip:
            raise NonFiniteError(
                f"non-finite {what} at step {self.global_step} (epoch {self.epoch}, loss={loss}); {self._on_disk()}"
            )
        if what:
            self.objective.module.load_state_dict(before[0])
            self.optimizer.load_state_dict(before[1])
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            print(f"skipping step {self.global_step}: non-finite {what} (loss={loss})")
            self._log({"kind": "skipped", "step": self.global_step, "epoch": self.epoch, "loss": str(loss)})
            total = self.steps_per_epoch * self.cfg.epochs
            if self.skipped > self.cfg.max_skipped_fraction * total:
                raise NonFiniteError(
                    f"{self.skipped} of the run's {total} steps skipped as non-finite, more than "
                    f"max_skipped_fraction={self.cfg.max_skipped_fraction}; {self._on_disk()}"
                )
        if self.scheduler is not None:
            self.scheduler.step()
        return None if what else loss

    def _step_cost(self, coords: torch.Tensor | None, batch: Any) -> int:
        return step_cost(self.estimator, self.objective, coords, batch, self.last_step_cost)

    def _budget_allows(self, cost: int) -> bool:
        """Rank 0's count decides (all-reduced), so every rank stops at the same step."""
        budget = self.cfg.query_budget
        if budget is None:
            return True
        over = self.main and self.objective.counter.queries + cost > budget
        return not bool(all_reduce_sum(torch.tensor([float(over)])).item() > 0)

    def fit(self) -> dict:
        lock_run_dir(self.out_dir)  # one writer: a no-op when the run already holds it
        self._restore_or_start()
        resumed_stopped, self.stopped = self.stopped, ""
        try:
            while self.epoch < self.cfg.epochs and not self.stopped:
                self._run_epoch(quiet_stop=bool(resumed_stopped))
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"stopped at step {self.global_step}; {self._on_disk()}") from None
        if self.main:
            plot_learning_curve(self.out_dir / METRICS, self.out_dir / CURVE, self.title)
        return {
            "stopped": self.stopped or "epochs",
            "epochs": self.epoch,
            "steps": self.global_step,
            "queries": self.objective.counter.queries,
            "forward_equivalents": self.objective.counter.forward_equivalents,
            "wall_s": self.elapsed,
            "eval": self.last_eval if self.last_eval is not None else self._evaluate(),
        }

    def _run_epoch(self, quiet_stop: bool) -> None:
        """Steps to the epoch's end (or the budget), then evaluation, the epoch row and a checkpoint.
        `quiet_stop`: the run was resumed after a budget stop, whose row is already logged."""
        epoch, start, ran = self.epoch, time.perf_counter(), 0
        coords = self.sampler.coords(epoch) if self.sampler is not None else None
        bar = tqdm(
            self._batches(epoch, self.step_in_epoch),
            total=self.steps_per_epoch,
            initial=self.step_in_epoch,
            desc=f"{self.phase}epoch {epoch + 1}/{self.cfg.epochs}",
            disable=not (self.main and self.cfg.progress),
            leave=False,
        )
        for batch in bar:
            if not self._budget_allows(self._step_cost(coords, batch)):
                self.stopped = "query budget"
                break
            queries = self.objective.counter.queries
            loss = self._train_step(to_device(batch, self.device), coords)
            self.last_step_cost = self.objective.counter.queries - queries
            self.global_step += 1
            self.step_in_epoch += 1
            ran += 1
            if loss is not None:
                self.sums["loss_sum"] += loss
                self.sums["steps"] += 1
                bar.set_postfix(loss=f"{loss:.4f}", queries=self.objective.counter.queries)
                if self.global_step % self.cfg.log_every == 0:
                    self._log({"kind": "train", "step": self.global_step, "epoch": epoch, "loss": loss,
                               "lr": self.optimizer.param_groups[0]["lr"], "queries": self.objective.counter.queries})
            if self.cfg.eval_every and self.global_step % self.cfg.eval_every == 0 and self.main:
                self.elapsed += time.perf_counter() - start  # evaluation is not training time
                self._log({"kind": "eval", "step": self.global_step, "epoch": epoch, "eval": self._evaluate(),
                           "queries": self.objective.counter.queries, "wall_s": self.elapsed})
                start = time.perf_counter()
            if self.cfg.checkpoint_every and self.global_step % self.cfg.checkpoint_every == 0:
                self.elapsed += time.perf_counter() - start
                start = time.perf_counter()
                self._save()
        bar.close()
        if self.stopped and ran == 0 and (quiet_stop or self.step_in_epoch == 0):
            return  # nothing new: the row was logged when the run first stopped here, or the epoch had no step
        if not self.stopped:
            self.epoch, self.step_in_epoch = epoch + 1, 0
        metrics = self._evaluate() if self.main else {}
        self.elapsed += time.perf_counter() - start
        steps, loss = self.sums["steps"], self.sums["loss_sum"] / max(1, self.sums["steps"])
        self._log({
            "kind": "epoch", "epoch": self.epoch, "step": self.global_step, "train_loss": loss, "eval": metrics,
            "queries": self.objective.counter.queries, "forward_equivalents": self.objective.counter.forward_equivalents,
            "queries_per_step": (self.objective.counter.queries - self.sums["queries_start"]) / max(1, steps),
            "wall_s": self.elapsed,
        })
        self.last_eval = metrics
        if self.main:
            summary = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
            where = f"{self.phase}epoch {epoch + 1}/{self.cfg.epochs}" + (f" (stopped: {self.stopped})" if self.stopped else "")
            tqdm.write(f"{where} loss={loss:.4f} {summary} queries={self.objective.counter.queries:,} wall={self.elapsed:.0f}s")
        if not self.stopped:
            self.sums = _epoch_sums(self.objective.counter.queries)
        self._save()


def _epoch_sums(queries: int) -> dict[str, float]:
    return {"loss_sum": 0.0, "steps": 0, "queries_start": queries}
