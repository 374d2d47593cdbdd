"""The wiring every app shares, so an app's `run` only builds what is its own (data, model, objective).

Estimator, optimizer, scheduler, coordinate sampler and `TrainerConfig` come from the app's typed
config here, one way for every app; so do the one rule for reusing saved pruning ratios and the one
error boundary that turns failures into one-line messages.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from .engine import (
    FirstOrder,
    Objective,
    SparseCoordinateSampler,
    compute_ratios,
    is_main,
    load_ratios,
    prunable_weights,
    save_ratios,
)
from .engine.distributed import shard_over_ranks
from .errors import ConfigError, RunError, one_line
from .rundir import release_run_dirs
from .trainer import CHECKPOINT, TrainerConfig

RATIOS = "ratios.json"
USAGE_ERROR = 2
INTERRUPTED = 130  # the shell's code for a process ended by SIGINT


def build(node: Any, what: str, *args: Any, **kwargs: Any) -> Any:
    """`instantiate(node)`, a failure reported as a ConfigError naming the config group `what`."""
    try:
        built = instantiate(node, **kwargs)
        return built(*args) if args else built
    except Exception as exc:  # hydra wraps the target's own error; torch.optim raises ValueError/TypeError
        raise ConfigError(f"{what}: {one_line(exc)}") from exc


def build_estimator(cfg: DictConfig, dim: int, first_order: bool = False) -> Any:
    """The ZO estimator of `cfg.estimator` for `dim` coordinates, or backprop for the first-order baselines.
    More random directions than coordinates is refused: CGE gets the exact ZO gradient with `dim`.
    Under torchrun its evaluator is wrapped to split the queries over the ranks (`shard_over_ranks`),
    here where the estimator is built, not behind the user's back in the Trainer."""
    if first_order:
        return FirstOrder()
    q = cfg.estimator.get("q")
    if isinstance(q, int) and q > dim:
        raise ConfigError(f"estimator.q={q} exceeds the model's {dim:,} coordinates (q <= d; estimator=cge takes d + 1)")
    estimator = build(cfg.estimator, "estimator")
    shard_over_ranks(estimator)
    return estimator


def build_optimizer(cfg: DictConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """`cfg.optimizer` is a partial `torch.optim` class (`_partial_: true`); the params fill it."""
    return build(cfg.optimizer, "optimizer", list(params))


def build_scheduler(cfg: DictConfig) -> Callable[..., Any] | None:
    """A partial `torch.optim.lr_scheduler` class; the Trainer fills the optimizer and step counts."""
    return None if cfg.get("scheduler") is None else build(cfg.scheduler, "scheduler")


def trainer_config(typed: Any, **overrides: Any) -> TrainerConfig:
    """The Trainer's settings: every `TrainerConfig` field the app's schema has, then `overrides`."""
    shared = {f.name: getattr(typed, f.name) for f in fields(TrainerConfig) if hasattr(typed, f.name)}
    return TrainerConfig(**{**shared, **overrides})


def ratio_settings(cfg: DictConfig, model_name: str) -> dict[str, Any]:
    """What a layer-wise pruning ratio file depends on (recorded in it, compared before reuse)."""
    sp = cfg.sparsity
    settings = {"method": sp.method, "sparsity": sp.sparsity, "ordering": sp.ordering, "model": model_name,
                "seed": cfg.seed}
    if sp.method in ("zo_grasp", "grasp"):
        settings.update(samples_per_class=sp.samples_per_class, q=sp.q, mu=sp.mu)
    return settings


def _load_ratios(path: str | Path, model: torch.nn.Module, only: list[str] | None) -> tuple[dict[str, float], dict[str, Any]]:
    try:
        return load_ratios(path, model, only)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"sparsity.ratios: {one_line(exc)}") from exc


def _trainable_weights(objective: Objective) -> list[str] | None:
    """The conv/linear weights of a subset-trained objective (None when it trains all of them)."""
    try:
        weights = list(prunable_weights(objective.module))
    except ValueError:  # nothing to score at all: compute_ratios says so below
        return None
    trainable = {b.name for b in objective.coords.blocks}
    return None if trainable >= set(weights) else [n for n in weights if n in trainable]


def build_sampler(
    cfg: DictConfig,
    objective: Objective,
    out_dir: Path,
    model_name: str,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    examples: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> SparseCoordinateSampler | None:
    """Sparse coordinate sets from layer-wise pruning ratios (None for dense CGE).

    The one rule for ratios: `sparsity.ratios=FILE` is used as given; otherwise the run's own
    `ratios.json` is reused only on resume and only if its recorded settings equal this run's, and
    anything else scores the model now (scoring queries count in the run) and records the settings.
    `examples` draws the scorers' batch lazily, so reuse and `random` cost no data. An objective that
    trains a subset of the model (`engine.subsets`) gets ratios over its own weights only (recorded in
    the settings); a subset without conv/linear weights (normalisation parameters, say) is estimated
    densely, as the sampler treats unscored tensors.
    """
    sp = cfg.sparsity
    if sp.ratios is None and sp.method == "dense":
        return None
    model = objective.module
    own, settings = out_dir / RATIOS, ratio_settings(cfg, model_name)
    only = _trainable_weights(objective)
    if only is not None:
        settings["trainable"] = only
        if not only:
            return SparseCoordinateSampler(objective.coords, {}, mask_interval=sp.mask_interval, seed=cfg.seed,
                                           dense_unscored=sp.dense_unscored)
    if sp.ratios is not None:
        ratios, _ = _load_ratios(sp.ratios, model, only)
    elif cfg.resume and own.exists() and (saved := _load_ratios(own, model, only))[1] == settings:
        ratios = saved[0]
    else:
        if not cfg.resume and (out_dir / CHECKPOINT).exists():
            raise FileExistsError(f"{out_dir} holds a run (its {RATIOS} stays); pass resume=true or pick another output dir")
        try:
            ratios = compute_ratios(
                sp.method, model, loss_fn, examples() if examples and sp.method != "random" else None,
                sparsity=sp.sparsity, ordering=sp.ordering, seed=cfg.seed, q=sp.q, mu=sp.mu,
                samples_per_class=sp.samples_per_class, counter=objective.counter, only=only,
            )
        except ValueError as exc:
            raise ConfigError(f"sparsity: {one_line(exc)}") from exc
        if is_main():
            save_ratios(own, ratios, settings)
    return SparseCoordinateSampler(objective.coords, ratios, mask_interval=sp.mask_interval, seed=cfg.seed,
                                   dense_unscored=sp.dense_unscored)


def debug_requested() -> bool:
    """Full tracebacks instead of one line: `HYDRA_FULL_ERROR=1` or the CLI's `--debug`."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def error_boundary(app: str, run: Callable[[DictConfig], dict]) -> Callable[[DictConfig], dict]:
    """The one place failures become one line: configuration errors (also those found while building
    the run, e.g. a dataset that is not on disk) exit 2, failures while working (`RunError`: a
    non-finite step, a black box, a solver, a file) exit 1; the last good checkpoint stays."""

    def job(cfg: DictConfig) -> dict:
        try:
            return run(cfg)
        except KeyboardInterrupt as exc:  # Ctrl-C: the last checkpoint on disk stays intact
            print(f"deepzero-task {app}: interrupted{': ' + one_line(exc) if str(exc) else ''}", file=sys.stderr)
            sys.exit(INTERRUPTED)
        except (ConfigError, FileExistsError, FileNotFoundError) as exc:
            code = USAGE_ERROR
            if debug_requested():
                raise
            message = one_line(exc)
        except (RunError, OSError) as exc:
            code = 1
            if debug_requested():
                raise
            message = one_line(exc)
        finally:
            release_run_dirs()  # the run directory's lock ends with the job
        print(f"deepzero-task {app}: error: {message}", file=sys.stderr)
        sys.exit(code)

    return job
