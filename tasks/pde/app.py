"""`deepzero-task pde`: Solver-in-the-Loop error correction (Um et al. 2020) through a black-box solver.

A coarse *source* solver drifts from a fine *reference* simulation restricted to its grid. A small CNN
corrects the state after every solver step, ``state_{k+1} = s + net(s)`` with ``s = solver.step(state_k)``,
and is trained so corrected rollouts follow the reference. Methods (``method=``):

* ``src``: the uncorrected solver (the lower bound; evaluation only);
* ``non``: first-order supervised training on precomputed one-step pairs, no solver in the loop;
* ``zo_sol``: the loss of an unrolled, corrected rollout through the numpy solver, whose gradient with
  respect to the network comes from loss queries only (the engine's CGE / sparse CGE / RGE): DeepZero;
* ``fo_sol``: the same rollout loss backpropagated through the solver's differentiable torch twin
  (the upper bound; solvers with a ``torch_twin``: Burgers, wake, PhiFlow wake).

Every method is evaluated the same way: corrected rollouts of the numpy solver on held-out simulations,
mean absolute error against the reference averaged over time (``eval.json``, PNG plots).
``python -m deepzero_apps.tasks.pde compare OUT.png RUN_DIR...`` tabulates and plots several runs.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import TensorDataset

from deepzero_apps.adapter import (
    build_estimator,
    build_optimizer,
    build_sampler,
    build_scheduler,
    trainer_config,
)
from deepzero_apps.apps import App
from deepzero_apps.checkpoint import atomic_write_json, load_checkpoint
from deepzero_apps.config import ConfigError, start_run
from deepzero_apps.engine import (
    FirstOrder,
    Objective,
    SparseCoordinateSampler,
    StackedObjective,
    call_stacked,
    is_main,
)
from deepzero_apps.errors import RunError, one_line
from deepzero_apps.loggers import build_logger
from deepzero_apps.solvers import SolverError, list_solvers, register_solver_configs
from deepzero_apps.trainer import CHECKPOINT, Trainer

from .conditions import Split, make_split
from .config import PdeConfig
from .data import SolverPair, Stepper, build_solvers, reference_data

EVAL = "eval.json"
LABELS = {"src": "SRC", "non": "NON", "zo_sol": "ZO-SOL", "fo_sol": "FO-SOL"}
log = logging.getLogger(__name__)
StepFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]



def correct(model: nn.Module, state: torch.Tensor) -> torch.Tensor:
    """``state + net(state)``: the net runs on its own device/dtype; solver states stay float64 on CPU."""
    p = next(model.parameters())
    return state + model(state.to(device=p.device, dtype=p.dtype)).to(state)


class OneStepObjective(Objective):
    """NON: squared error of one corrected coarse step; batch = (solver output, reference target)."""

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        stepped, target = batch
        return F.mse_loss(correct(self.module, stepped), target)


class RolloutObjective(StackedObjective):
    """SOL: mean squared error of `unroll` corrected solver steps against the reference; batch = (sims, t0).

    `step` is the black-box solver (a numpy rollout, queried by the ZO estimators) or its torch twin
    (differentiable, for FO-SOL); the windows index the reference trajectories `refs`. The first
    solver step does not depend on the network, so the base query keeps it (`forward_cached`) and
    every perturbed query of the step starts from it; K perturbed parameter vectors run as one
    stacked network call per step and one solver call on all K x B states (`_losses`).
    """

    def __init__(self, module: nn.Module, step: StepFn, refs: torch.Tensor, unroll: int):
        super().__init__(module)
        self.step, self.refs, self.unroll = step, refs, unroll

    def first_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        sims, t0 = batch
        return self.step(self.refs[sims, t0], sims, 1)

    def _loss(
        self, batch: tuple[torch.Tensor, torch.Tensor], first: torch.Tensor | None = None
    ) -> torch.Tensor:
        sims, t0 = batch
        state = self.first_step(batch) if first is None else first
        loss = torch.zeros((), dtype=state.dtype)
        for k in range(1, self.unroll + 1):
            if k > 1:
                state = self.step(state, sims, k)
            state = correct(self.module, state)
            loss = loss + F.mse_loss(state, self.refs[sims, t0 + k])
        return loss / self.unroll

    def forward_cached(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.first_step(batch)
        self.counter.add(1, 1.0)
        return self._loss(batch, first), first

    def loss_from(
        self, stage: int, cache: torch.Tensor | None, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        self.counter.add(1, 1.0)
        return self._loss(batch, cache)

    def _losses(
        self, thetas: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor], first: Any
    ) -> torch.Tensor:
        sims, t0 = batch
        first = self.first_step(batch) if first is None else first
        k, shape = len(thetas), first.shape
        params = self.stacked_parameters(thetas)
        net = next(self.module.parameters())
        state = first.expand(k, *shape)
        loss = torch.zeros(k, dtype=first.dtype)
        for n in range(1, self.unroll + 1):
            if n > 1:  # one solver call on all K x B states
                state = self.step(state.reshape(k * len(sims), *shape[1:]), sims.repeat(k), n).view(k, *shape)
            x = state.to(device=net.device, dtype=net.dtype)
            state = state + call_stacked(self.module, params, x).to(state)
            loss = loss + (state - self.refs[sims, t0 + n]).square().flatten(1).mean(1)
        return loss / self.unroll


def black_box_step(stepper: Stepper) -> StepFn:
    """The numpy solver as a step function: no autograd, every output checked."""

    def step(state: torch.Tensor, sims: torch.Tensor, k: int) -> torch.Tensor:
        return torch.from_numpy(stepper(state.detach().numpy(), sims.tolist(), k))

    return step


def twin_step(pair: SolverPair, stepper: Stepper) -> StepFn:
    """The solver's differentiable torch twin with the same per-simulation conditions as `stepper`."""
    twin = pair.coarse.torch_twin()
    conditions = {
        key: torch.as_tensor(np.stack([np.asarray(c[key], dtype=np.float64) for c in stepper.conditions]))
        for key in (stepper.conditions[0] if stepper.conditions else {})
    }

    def step(state: torch.Tensor, sims: torch.Tensor, k: int) -> torch.Tensor:
        return twin(state, **{key: value[sims] for key, value in conditions.items()})

    return step


@torch.no_grad()
def corrected_rollout(
    model: nn.Module | None, stepper: Stepper, refs: torch.Tensor, steps: int
) -> torch.Tensor:
    """Rollouts of every simulation in `refs` from its first frame; `model=None` is the uncorrected source."""
    sims = torch.arange(len(refs))
    step = black_box_step(stepper)
    state, frames = refs[:, 0], [refs[:, 0]]
    for k in range(1, steps + 1):
        state = step(state, sims, k)
        if model is not None:
            state = correct(model, state)
        frames.append(state)
    return torch.stack(frames, dim=1)


def mae_over_time(traj: torch.Tensor, refs: torch.Tensor) -> list[float]:
    """Mean absolute error per step 1..T over simulations, channels and cells."""
    steps = traj.shape[1] - 1
    return (traj[:, 1:] - refs[:, 1 : steps + 1]).abs().mean(dim=(0, 2, 3, 4)).tolist()


def per_simulation_mae(traj: torch.Tensor, refs: torch.Tensor) -> list[float]:
    """Mean absolute error of each simulation over steps 1..T, channels and cells (for paired tests)."""
    steps = traj.shape[1] - 1
    return (traj[:, 1:] - refs[:, 1 : steps + 1]).abs().mean(dim=(1, 2, 3, 4)).tolist()


def held_out(cfg: DictConfig, pair: SolverPair, split: Split) -> tuple[Stepper, torch.Tensor]:
    """The source solver on a held-out split's simulations and their reference trajectories."""
    d = cfg.data
    refs = reference_data(pair, cfg.solver, split.seeds, d.steps, d.warmup_steps, d.cache_dir, split.values)
    return Stepper(pair.coarse, split.seeds, split.values), torch.from_numpy(refs)


def build_model(model_cfg: DictConfig, pair: SolverPair) -> nn.Module:
    """The correction network, sized from the solver's channels and padded to match its boundaries.

    The output layer starts at zero, so every method starts from the uncorrected solver (SRC) and
    the first ZO steps are not spent undoing a random correction.
    """
    spec = OmegaConf.to_container(model_cfg, resolve=True)
    channels = len(pair.coarse.channels)
    fill = {
        "in_channels": channels,
        "out_channels": channels,
        "padding_mode": "circular" if pair.coarse.grid.boundary == "periodic" else "zeros",
    }
    try:
        model = instantiate(model_cfg, **{k: v for k, v in fill.items() if k not in spec})
    except Exception as exc:  # hydra wraps the factory's own error
        raise ConfigError(f"model: {one_line(exc)}") from exc
    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    if not layers:
        raise ConfigError("model: the correction network has no conv or linear layer")
    nn.init.zeros_(layers[-1].weight)
    if layers[-1].bias is not None:
        nn.init.zeros_(layers[-1].bias)
    return model


def load_initial_weights(model: nn.Module, init_from: str) -> None:
    """Warm start from another run (e.g. SOL fine-tuning of a NON network); optimizer state is not taken."""
    path = Path(init_from)
    state = load_checkpoint(path / CHECKPOINT if path.is_dir() else path)
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as exc:
        raise ConfigError(
            f"init_from='{init_from}' does not hold weights of this model: {one_line(exc)}"
        ) from exc
    log.info(f"pde: initial weights from {path}")


def one_step_pairs(stepper: Stepper, refs: torch.Tensor) -> TensorDataset:
    """NON's training set: (coarse step of reference frame t, reference frame t + 1) for every sim and t."""
    sims = torch.arange(len(refs))
    step = black_box_step(stepper)
    stepped = torch.stack([step(refs[:, t], sims, t + 1) for t in range(refs.shape[1] - 1)], dim=1)
    return TensorDataset(stepped.flatten(0, 1), refs[:, 1:].flatten(0, 1))


def rollout_windows(num_sims: int, steps: int, unroll: int) -> TensorDataset:
    """SOL's training set: every (simulation, start frame) with `unroll` reference frames after it."""
    sims, starts = torch.meshgrid(torch.arange(num_sims), torch.arange(steps - unroll + 1), indexing="ij")
    return TensorDataset(sims.flatten(), starts.flatten())


def build_training(
    cfg: DictConfig, pair: SolverPair, model: nn.Module, train: Split, train_refs: torch.Tensor, out_dir: Path
) -> tuple[Objective, Any, TensorDataset, SparseCoordinateSampler | None]:
    """Objective, estimator, training set and coordinate sampler of `cfg.method`."""
    stepper = Stepper(pair.coarse, train.seeds, train.values)
    if cfg.method == "non":
        return OneStepObjective(model), FirstOrder(), one_step_pairs(stepper, train_refs), None
    windows = rollout_windows(len(train_refs), cfg.data.steps, cfg.unroll)
    if cfg.method == "fo_sol":
        return (
            RolloutObjective(model, twin_step(pair, stepper), train_refs, cfg.unroll),
            FirstOrder(),
            windows,
            None,
        )
    objective = RolloutObjective(model, black_box_step(stepper), train_refs, cfg.unroll)
    sampler = build_sampler(cfg, objective, out_dir, cfg.model.get("name", "correction_net"))
    return objective, build_estimator(cfg, objective.coords.dim), windows, sampler


def train(
    cfg: DictConfig,
    typed: Any,
    pair: SolverPair,
    model: nn.Module,
    evaluate: Callable[[], dict],
    out_dir: Path,
    split: Split,
) -> dict:
    """Fit `model` on the training `split` with the shared Trainer (checkpoints, resume, metrics.jsonl,
    learning curve, budget)."""
    d, seeds = cfg.data, split.seeds
    train_refs = torch.from_numpy(
        reference_data(pair, cfg.solver, seeds, d.steps, d.warmup_steps, d.cache_dir, split.values)
    )
    objective, estimator, train_set, sampler = build_training(cfg, pair, model, split, train_refs, out_dir)
    per_step = f", {sampler.num_coords:,} of {objective.coords.dim:,} coordinates per step" if sampler else ""
    unit = "pairs" if cfg.method == "non" else "windows"
    log.info(
        f"pde: {LABELS[cfg.method]} on {len(train_set)} training {unit} of {len(seeds)} simulations, "
        f"{objective.coords.dim:,} parameters{per_step}"
    )
    trainer = Trainer(
        objective,
        estimator,
        build_optimizer(cfg, model.parameters()),
        train_set,
        evaluate=evaluate,
        out_dir=out_dir,
        config=trainer_config(typed),
        scheduler_factory=build_scheduler(cfg),
        sampler=sampler,
        device=cfg.device,
        title=f"pde {pair.name} {LABELS[cfg.method]}",
        sinks=build_logger(cfg.logger, out_dir),
    )
    return trainer.fit()


# ---- plots -------------------------------------------------------------------------------------------
def plot_errors(curves: dict[str, Sequence[float]], png: Path, title: str) -> None:
    """Mean absolute error against the reference over the rollout, one line per method."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for label, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, label=label)
    ax.set(xlabel="solver step", ylabel="MAE vs reference", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def plot_snapshots(rows: dict[str, np.ndarray], channels: Sequence[str], png: Path, title: str) -> None:
    """One frame per row (reference / source / corrected), one column per channel, shared colour scale."""
    ny, nx = next(iter(rows.values())).shape[-2:]
    aspect = max(ny / nx, 0.25)  # 1-D problems (ny = 1) are drawn as bands
    fig = Figure(figsize=(3.6 * len(channels), 0.6 + 3.0 * len(rows) * aspect), layout="constrained")
    axes = np.asarray(fig.subplots(len(rows), len(channels), squeeze=False))
    for c, name in enumerate(channels):
        lo = min(float(f[c].min()) for f in rows.values())
        hi = max(float(f[c].max()) for f in rows.values())
        for r, (label, frame) in enumerate(rows.items()):
            im = axes[r, c].imshow(frame[c], origin="lower", cmap="RdBu_r", vmin=lo, vmax=hi, aspect="auto")
            axes[r, c].set(xticks=[], yticks=[], title=f"{label}: {name}")
        fig.colorbar(im, ax=list(axes[:, c]), shrink=0.8)
    fig.suptitle(title)
    fig.savefig(png, dpi=100)


# ---- the app -----------------------------------------------------------------------------------------
def run(cfg: DictConfig) -> dict:
    typed, out_dir = start_run(cfg, PdeConfig)
    out_dir.mkdir(parents=True, exist_ok=True)
    d, label = cfg.data, LABELS[cfg.method]
    log.info(f"pde: registered solvers: {', '.join(list_solvers())}; using '{cfg.solver.name}'")
    pair = build_solvers(cfg.solver)
    log.info(
        f"pde: {label}, reference grid {pair.fine.grid.shape} -> source grid {pair.coarse.grid.shape}, "
        f"output {out_dir}"
    )
    eval_steps = cfg.eval_steps or d.steps
    conditions = typed.solver.condition_sets()
    splits = {k: make_split(k, seeds, conditions[k]) for k, seeds in typed.data.seeds().items()}
    test_seeds = splits["test"].seeds
    try:
        test_stepper, test_refs = held_out(cfg, pair, splits["test"])
        src = corrected_rollout(None, test_stepper, test_refs, eval_steps)
        model, summary = None, {}
        if cfg.method != "src":
            model = build_model(cfg.model, pair).to(cfg.device)
            if cfg.init_from is not None:
                load_initial_weights(model, cfg.init_from)

            def evaluate() -> dict[str, float]:
                traj = corrected_rollout(model, test_stepper, test_refs, eval_steps)
                return {"test_mae": float(np.mean(mae_over_time(traj, test_refs)))}

            summary = train(cfg, typed, pair, model, evaluate, out_dir, splits["train"])
        traj = src if model is None else corrected_rollout(model, test_stepper, test_refs, eval_steps)
        validation = {}
        if splits["validation"].seeds:  # for choosing hyper-parameters, never the test split
            val_stepper, val_refs = held_out(cfg, pair, splits["validation"])
            validation = {
                "mae_val": per_simulation_mae(corrected_rollout(model, val_stepper, val_refs, eval_steps), val_refs),
                "mae_val_src": per_simulation_mae(corrected_rollout(None, val_stepper, val_refs, eval_steps), val_refs),
            }
    except SolverError as exc:
        ckpt = out_dir / CHECKPOINT
        kept = f"last good checkpoint: {ckpt} (resume=true continues it)" if ckpt.exists() else "no checkpoint written"
        raise SolverError(f"{one_line(exc)}; {kept}") from exc
    curve, src_curve = mae_over_time(traj, test_refs), mae_over_time(src, test_refs)
    bad = {name: value for name, value in (("mae", float(np.mean(curve))), ("mae_src", float(np.mean(src_curve))))
           if not math.isfinite(value)}
    if bad:  # never a result: a non-finite reference or rollout slipped past every check
        raise RunError(f"pde: non-finite metric {', '.join(f'{k}={v}' for k, v in bad.items())}; {EVAL} not written")
    result = {
        "method": cfg.method,
        "label": label,
        "solver": pair.name,
        "mae": float(np.mean(curve)),
        "mae_src": float(np.mean(src_curve)),
        "mae_over_time": curve,
        "mae_src_over_time": src_curve,
        "mae_per_sim": per_simulation_mae(traj, test_refs),
        "mae_src_per_sim": per_simulation_mae(src, test_refs),
        **{k: float(np.mean(v)) for k, v in validation.items()},
        **{f"{k}_per_sim": v for k, v in validation.items()},
        "eval_steps": eval_steps,
        "test_seeds": test_seeds,
        "train_seeds": splits["train"].seeds,
        "conditions": conditions,
        "simulations": {k: split.simulations() for k, split in splits.items()},
        "reference_grid": list(pair.fine.grid.shape),
        "source_grid": list(pair.coarse.grid.shape),
        "parameters": sum(p.numel() for p in model.parameters()) if model is not None else 0,
        "train": {k: v for k, v in summary.items() if k != "eval"},
    }
    if is_main():
        atomic_write_json(out_dir / EVAL, result)
        curves = {"SRC": src_curve} if model is None else {"SRC": src_curve, label: curve}
        plot_errors(curves, out_dir / "error_over_time.png", f"{pair.name}: held-out simulations")
        rows = {"reference": test_refs[0, eval_steps].numpy(), "source": src[0, -1].numpy()}
        if model is not None:
            rows[label] = traj[0, -1].numpy()
        plot_snapshots(
            rows,
            pair.coarse.channels,
            out_dir / "snapshots.png",
            f"{pair.name}, test seed {test_seeds[0]}, step {eval_steps}",
        )
        log.info(
            f"pde done: {label} MAE={result['mae']:.4f} (SRC {result['mae_src']:.4f}) over {eval_steps} "
            f"steps of {len(test_seeds)} held-out simulations; output={out_dir}"
        )
    return result


def compare(png: Path, run_dirs: Sequence[Path]) -> str:
    """Markdown table of several runs' eval.json and one error-over-time plot (SRC drawn once).

    A run whose directory is not named after its method is labelled with the directory too.
    """
    results = {Path(r).name: json.loads((Path(r) / EVAL).read_text()) for r in run_dirs}
    first = next(iter(results.values()))
    curves = {"SRC": first["mae_src_over_time"]}
    lines = [
        "| method | MAE (held-out, mean over time) | final-step MAE |",
        "|---|---|---|",
        f"| SRC | {first['mae_src']:.4f} | {first['mae_src_over_time'][-1]:.4f} |",
    ]
    for name, r in results.items():
        if r["method"] != "src":
            label = r["label"] if name == r["method"] else f"{r['label']} ({name})"
            curves[label] = r["mae_over_time"]
            lines.append(f"| {label} | {r['mae']:.4f} | {r['mae_over_time'][-1]:.4f} |")
    plot_errors(curves, png, f"{first['solver']}: held-out simulations")
    return "\n".join(lines)


def register_configs() -> None:
    """pde's config hook: `solver=<name>` for every registered solver (built-ins, entry points), its
    defaults from its class, and `--help` listing them."""
    register_solver_configs()
    OmegaConf.register_new_resolver("pde_solvers", lambda: ", ".join(list_solvers()), replace=True)


APP = App(
    "pde", "PDE error correction (Solver-in-the-Loop) trained through a black-box solver", PdeConfig, run,
    register_configs=register_configs,
)

