"""Data of `deepzero-task pde`: the reference/source solver pair, cached reference simulations and the
checked black-box stepper.

Solver-in-the-Loop compares a coarse *source* solver against a fine *reference* run of the same PDE
restricted to the coarse grid. Fine runs dominate the cost of small experiments, so every simulation is
cached on disk under a key made of everything that determines it -- the solver's code (class, package
version, source hash; an external program's bytes and command line), its configuration and resolved
description, the seed and the step counts -- and reused by any later run (another method, another
training-set size, a resumed run). Each file carries an HMAC-SHA256 of its trajectory under a secret
kept apart from it (`KEY_FILE`, owner-only) and bound to its key, and is checked finite and of the
expected shape on load: a truncated, zeroed, edited (data and digest together), swapped or NaN file
is re-simulated, never used. Whoever can read the key (the owner) can still forge a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import json
import os
import re
import secrets
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

CACHE_FORMAT = 3  # bump when the stored arrays change meaning


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
    if fine.describe() == coarse.describe():
        print(f"pde data: warning: {_same_simulation(spec, fine)}")
    return SolverPair(spec["name"], fine, coarse)


def _same_simulation(spec: dict[str, Any], fine: Solver) -> str:
    """One line: the two instances look alike (same grid, dt, described physics); what else differs."""
    ref, src = {**spec["params"], **spec["reference"]}, {**spec["params"], **spec["source"]}
    differ = sorted(k for k in {*ref, *src} if ref.get(k) != src.get(k))
    how = f"they differ only in {', '.join(differ)}" if differ else "they are built from the same arguments"
    return (
        f"the reference and source solvers describe themselves identically (grid {list(fine.grid.shape)}, "
        f"dt {fine.dt}) and {how}: unless that changes the simulation, the correction is trained against "
        "the solver itself (SRC error 0); give the reference a finer grid"
    )


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


KEY_FILE = ".digest_key"  # in the cache directory, owner-only: the secret of the files' digests


def _digest_key(root: Path) -> bytes:
    """The cache directory's secret (created on first use, mode 0600), so that a digest cannot be
    recomputed by whoever edits a cached file without also reading this key."""
    path = root / KEY_FILE
    root.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
            f.flush()
            os.fsync(f.fileno())
    key = path.read_bytes()
    if len(key) != 32:
        raise ConfigError(f"{path} is not a cache digest key (expected 32 bytes, got {len(key)}); delete it "
                          "together with the cached simulations next to it")
    return key


def _digest(key: bytes, name: str, array: np.ndarray) -> str:
    """HMAC-SHA256 of the trajectory bound to its cache file's name (its key), shape and dtype."""
    mac = hmac.new(key, f"{name}\0{array.dtype.str}\0{array.shape}\0".encode(), hashlib.sha256)
    mac.update(np.ascontiguousarray(array).tobytes())
    return mac.hexdigest()


def save_cached(path: Path, traj: np.ndarray) -> None:
    """The trajectory and its keyed digest in one ``.npz``, written atomically (temp, fsync, rename)."""
    buf = io.BytesIO()
    np.savez(buf, trajectory=traj, hmac_sha256=np.array(_digest(_digest_key(path.parent), path.name, traj)))
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def load_cached(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The cached trajectory, or ``None`` (with a message) if the file is unreadable, truncated,
    altered, copied from another key, of another shape, or not finite."""
    try:
        with np.load(path, allow_pickle=False) as f:
            traj, stored = f["trajectory"], str(f["hmac_sha256"])
        if not hmac.compare_digest(_digest(_digest_key(path.parent), path.name, traj), stored):
            problem = "digest mismatch"
        elif traj.shape != shape:
            problem = f"shape {traj.shape}, expected {shape}"
        elif traj.dtype.kind != "f" or not np.isfinite(traj).all():
            problem = f"{traj.dtype} values, not all finite"
        else:
            problem = None
    except ConfigError:
        raise
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
