"""Data of `deepzero-task pde`: the reference/source solver pair, cached reference simulations and the
checked black-box stepper.

Solver-in-the-Loop compares a coarse *source* solver against a fine *reference* run of the same PDE
restricted to the coarse grid. Fine runs dominate the cost of small experiments, so every simulation is
cached on disk under a key made of everything that determines it -- the solver's code (class, package
version, source hash; an external program's bytes and command line), its configuration and resolved
description, the seed and the step counts -- and reused by any later run (another method, another
training-set size, a resumed run). Each file carries a checksum: a truncated or zeroed file is
re-simulated, never used.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from deepzero_apps.checkpoint import atomic_write
from deepzero_apps.config import ConfigError
from deepzero_apps.solvers import Solver, check_state, create_solver

CACHE_FORMAT = 2  # bump when the stored arrays change meaning


@dataclass
class SolverPair:
    """The fine (reference) and coarse (source) instances of one solver."""

    name: str
    fine: Solver
    coarse: Solver


def build_solvers(solver_cfg: DictConfig) -> SolverPair:
    """Instantiate `solver.name` twice: shared `params` plus the `reference` / `source` overrides."""
    spec = OmegaConf.to_container(solver_cfg, resolve=True)
    built = {}
    for role in ("reference", "source"):
        kwargs = {**spec["params"], **spec[role]}
        try:
            built[role] = create_solver(spec["name"], **kwargs)
        except (TypeError, ValueError, ImportError) as exc:
            raise ConfigError(f"solver '{spec['name']}' ({role} instance): {exc}") from exc
    fine, coarse = built["reference"], built["source"]
    try:
        fine.downsample(fine.initial_state(0), coarse)
    except ValueError as exc:
        raise ConfigError(
            f"solver: reference grid {fine.grid.shape} vs source grid {coarse.grid.shape}: {exc}"
        ) from exc
    if len(fine.channels) != len(coarse.channels):
        raise ConfigError(
            f"solver: reference channels {fine.channels} differ from source channels {coarse.channels}"
        )
    return SolverPair(spec["name"], fine, coarse)


def solver_identity(pair: SolverPair, solver_cfg: DictConfig) -> dict[str, Any]:
    """What the reference solver is: its configuration, resolved description and code fingerprint.
    The condition sets are left out: a simulation's key has its own drawn condition values instead."""
    spec = OmegaConf.to_container(solver_cfg, resolve=True)
    spec.pop("conditions", None)
    return {
        "format": CACHE_FORMAT,
        "solver": spec,
        "fine": {**pair.fine.describe(), **pair.fine.fingerprint()},
        "coarse_shape": list(pair.coarse.grid.shape),
    }


def cache_key(
    identity: dict[str, Any], seed: int, steps: int, warmup_steps: int, conditions: dict[str, Any] | None = None
) -> str:
    """A hash of everything a reference simulation depends on (`solver_identity`, seed, step counts, its
    condition values)."""
    spec = {**identity, "seed": int(seed), "steps": int(steps), "warmup_steps": int(warmup_steps)}
    if conditions:
        spec["conditions"] = conditions
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def step_conditions(solver: Solver, seed: int, values: dict[str, Any] | None) -> dict[str, Any]:
    """The keywords of every `step` of simulation `seed`: its condition values and the solver's
    per-seed data; a value the solver refuses is a ConfigError (one line)."""
    values = values or {}
    try:
        return {**values, **solver.conditions(int(seed), **values)}
    except ValueError as exc:
        raise ConfigError(f"solver.conditions (simulation {seed}, {values}): {exc}") from exc


def simulate(
    pair: SolverPair, seed: int, steps: int, warmup_steps: int, values: dict[str, Any] | None = None
) -> np.ndarray:
    """Fine run of `seed` with condition `values` (every step checked), downsampled to the source grid:
    (steps + 1, C, ny, nx)."""
    fine = pair.fine
    state = fine.check(fine.initial_state(seed), step="initial_state", what="initial state")
    conditions = step_conditions(fine, seed, values)
    frames = []
    for i in range(warmup_steps + steps + 1):
        if i >= warmup_steps:
            frames.append(fine.downsample(state, pair.coarse))
        if i < warmup_steps + steps:
            state = fine.check(fine.step(state, **conditions), step=i + 1)
    return np.stack(frames)


def _checksum(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def save_cached(path: Path, traj: np.ndarray) -> None:
    """The trajectory and its checksum in one ``.npz``, written atomically (temp, fsync, rename)."""
    buf = io.BytesIO()
    np.savez(buf, trajectory=traj, sha256=np.array(_checksum(traj)))
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def load_cached(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The cached trajectory, or ``None`` (with a message) if the file is unreadable, truncated or altered."""
    try:
        with np.load(path, allow_pickle=False) as f:
            traj, stored = f["trajectory"], str(f["sha256"])
        problem = None if _checksum(traj) == stored else "checksum mismatch"
        if problem is None and traj.shape != shape:
            problem = f"shape {traj.shape}, expected {shape}"
    except Exception as exc:  # noqa: BLE001 - any unreadable file is simply re-simulated
        problem = f"{type(exc).__name__}: {exc}"
    if problem is None:
        return traj
    print(f"pde data: cached simulation {path} is damaged ({' '.join(problem.split())}); re-simulating")
    return None


def reference_data(
    pair: SolverPair,
    solver_cfg: DictConfig,
    seeds: Sequence[int],
    steps: int,
    warmup_steps: int,
    cache_dir: str,
    values: Sequence[dict[str, Any]] | None = None,
) -> np.ndarray:
    """Downsampled reference trajectories of `seeds` with condition `values` (one dict per seed),
    (S, steps + 1, C, ny, nx): cached or simulated."""
    root = Path(cache_dir)
    shape = (steps + 1, *pair.coarse.state_shape)
    identity, prefix = solver_identity(pair, solver_cfg), re.sub(r"[^\w.-]", "_", pair.name)
    trajectories, made, start = [], 0, time.perf_counter()
    for seed, cond in zip(seeds, values or [{}] * len(seeds)):
        path = root / f"{prefix}-{cache_key(identity, seed, steps, warmup_steps, cond)}.npz"
        traj = load_cached(path, shape) if path.exists() else None
        if traj is None:
            traj = simulate(pair, seed, steps, warmup_steps, cond)
            save_cached(path, traj)
            made += 1
        trajectories.append(traj)
    reused = len(seeds) - made
    if made:
        print(
            f"pde data: generated {made} reference simulation(s) in {time.perf_counter() - start:.1f}s "
            f"(reused {reused} from cache), cached in {root}"
        )
    else:
        print(f"pde data: reused {reused} cached reference simulation(s) from {root}")
    return np.stack(trajectories)


class Stepper:
    """The coarse solver as the training loop sees it: a black box on a batch of simulations.

    Each simulation keeps its own fixed conditions (forcing, Reynolds number); every output is checked
    (NaN/inf/shape -> `SolverError` naming the solver and the rollout step).
    """

    def __init__(self, solver: Solver, seeds: Sequence[int], values: Sequence[dict[str, Any]] | None = None):
        self.solver = solver
        self.conditions: list[dict[str, Any]] = [
            step_conditions(solver, s, v) for s, v in zip(seeds, values or [{}] * len(seeds))
        ]

    def batched_conditions(self, sims: Sequence[int]) -> dict[str, list[Any]]:
        """Per-simulation conditions as lists of length B (split per sample by `Solver.step_batch`)."""
        keys = self.conditions[0].keys() if self.conditions else ()
        return {k: [self.conditions[s][k] for s in sims] for k in keys}

    def __call__(self, states: np.ndarray, sims: Sequence[int], step: int) -> np.ndarray:
        out = self.solver.step_batch(states, **self.batched_conditions(sims))
        return check_state(
            self.solver.name, out, (len(sims), *self.solver.state_shape), step=step, what="output"
        )
