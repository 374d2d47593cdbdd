"""`deepzero-task pde`'s schema: the solver pair, the reference data and the method (docs/solvers.md)."""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepzero_apps.config import ZOTrainConfig, method_mode, require
from deepzero_apps.errors import ConfigError
from deepzero_apps.solvers import check_solver_config, get_solver_class

from .conditions import resolve_conditions


@dataclass
class PdeSolverConfig:
    """A registered solver (`list_solvers()`) built twice: `params` shared, `reference`/`source` per grid."""

    name: str = "burgers"
    params: dict[str, Any] = field(default_factory=dict)
    reference: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    # train / validation / test condition sets of the solver's declared conditions (tasks/pde/conditions.py)
    conditions: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            check_solver_config(self.name, {"params": self.params, "reference": self.reference, "source": self.source})
        except (ValueError, ImportError) as exc:
            raise ConfigError(f"solver.name: {exc}" if "solver." not in str(exc) else str(exc)) from exc
        self.condition_sets()

    def condition_sets(self) -> dict[str, dict[str, Any]]:
        """The checked train / validation / test condition sets, unset conditions at the solver's defaults.
        (Not stored back: the schema's own instance would otherwise carry one solver's conditions into
        every other solver's config.)"""
        declared = getattr(get_solver_class(self.name), "condition_defaults", None) or {}
        return resolve_conditions(self.name, declared, self.conditions)


@dataclass
class PdeDataConfig:
    """Reference simulations: seeds 0.. for training, val_seed_start.. for validation (choosing
    hyper-parameters), test_seed_start.. held out; `warmup_steps` discarded, then `steps` kept (cached in
    `cache_dir`). Each split's conditions are `solver.conditions.<split>`."""

    train_sims: int = 8
    val_sims: int = 0  # validation simulations (eval.json: mae_val); 0: none
    test_sims: int = 4
    val_seed_start: int = 2000
    test_seed_start: int = 1000
    steps: int = 32
    warmup_steps: int = 0
    cache_dir: str = "data/pde"

    def __post_init__(self) -> None:
        require(self.train_sims >= 1, f"data.train_sims={self.train_sims} must be >= 1")
        require(self.test_sims >= 1, f"data.test_sims={self.test_sims} must be >= 1")
        require(self.val_sims >= 0, f"data.val_sims={self.val_sims} must be >= 0")
        require(
            self.test_seed_start >= self.train_sims,
            f"data.test_seed_start={self.test_seed_start} must be >= data.train_sims={self.train_sims} "
            "(test simulations are held out)",
        )
        val, test = range(self.val_seed_start, self.val_seed_start + self.val_sims), self.seeds()["test"]
        require(
            self.val_sims == 0 or (self.val_seed_start >= self.train_sims and not set(val) & set(test)),
            f"data.val_seed_start={self.val_seed_start}: validation seeds {val.start}..{val.stop - 1} overlap the "
            f"training (0..{self.train_sims - 1}) or test ({test[0]}..{test[-1]}) seeds",
        )
        require(self.steps >= 1, f"data.steps={self.steps} must be >= 1")
        require(self.warmup_steps >= 0, f"data.warmup_steps={self.warmup_steps} must be >= 0")
        require(_writable(Path(self.cache_dir)), f"data.cache_dir='{self.cache_dir}' cannot be created or written")

    def seeds(self) -> dict[str, list[int]]:
        """The simulation seeds of each split (disjoint, by the checks above)."""
        return {
            "train": list(range(self.train_sims)),
            "validation": list(range(self.val_seed_start, self.val_seed_start + self.val_sims)),
            "test": list(range(self.test_seed_start, self.test_seed_start + self.test_sims)),
        }


def _writable(path: Path) -> bool:
    """`path` is a directory a file can be created in, or could be made one (probed with a temporary
    directory in its nearest existing parent, removed at once); the run would otherwise fail late."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        with tempfile.TemporaryDirectory(dir=path):
            return True
    except OSError:
        return False


PDE_METHODS = ("src", "non", "zo_sol", "fo_sol")


@dataclass
class PdeConfig(ZOTrainConfig):
    """Solver-in-the-Loop; `method` picks the training, and the trainer's `mode` follows from it (not set)."""

    mode: str | None = None
    method: str = "zo_sol"  # src: uncorrected solver | non: supervised one-step pairs (FO) | zo_sol | fo_sol
    epochs: int = 1
    batch_size: int = 2  # rollout windows (or one-step pairs for non) per step
    unroll: int = 4  # solver steps per training rollout (zo_sol, fo_sol)
    eval_steps: int | None = None  # rollout length on the test simulations (null: data.steps)
    init_from: str | None = None  # start from another run's weights (its checkpoint.pt or run directory)
    solver: PdeSolverConfig = field(default_factory=PdeSolverConfig)
    data: PdeDataConfig = field(default_factory=PdeDataConfig)

    def __post_init__(self) -> None:
        self.mode = method_mode("pde", self.method, self.mode, PDE_METHODS, first_order=("src", "non", "fo_sol"))
        super().__post_init__()
        steps = self.data.steps
        require(1 <= self.unroll <= steps, f"unroll={self.unroll} must be in [1, data.steps={steps}]")
        require(
            self.eval_steps is None or 1 <= self.eval_steps <= steps,
            f"eval_steps={self.eval_steps} must be in [1, data.steps={steps}]",
        )
        require(
            self.sparsity.ratios is not None or self.sparsity.method in ("dense", "random"),
            f"sparsity.method='{self.sparsity.method}' scores need class labels; pde supports dense or "
            "random (or sparsity.ratios=FILE)",
        )
        found = self.init_from is None or Path(self.init_from).exists()
        require(found, f"init_from='{self.init_from}' does not exist")
        same = self.method != "src" and _same_instances(self.solver)
        require(not same, _same_instances_message(self.solver, self.method) if same else "")
        twin = getattr(get_solver_class(self.solver.name), "torch_twin", None)
        require(
            self.method != "fo_sol" or callable(twin),
            f"method=fo_sol needs a differentiable torch twin of the solver and '{self.solver.name}' has "
            "none (burgers, wake and phiflow_wake have one); use method=zo_sol",
        )


def _same_instances(solver: PdeSolverConfig) -> bool:
    """Reference and source built from identical arguments: the same simulation twice."""
    return {**solver.params, **solver.reference} == {**solver.params, **solver.source}


def _same_instances_message(solver: PdeSolverConfig, method: str) -> str:
    """Why a training method is refused, and which settings make the two instances differ."""
    declared = getattr(get_solver_class(solver.name), "defaults", None) or {}
    per_instance = [*declared.get("reference", {}), *declared.get("source", {})]
    grid_like = [k for k in solver.params if re.search(r"resolution|grid|shape", k)]
    if per_instance:
        how = f"e.g. solver.reference.{per_instance[0]} finer than solver.source.{per_instance[0]}"
    elif grid_like:
        key = grid_like[0]
        how = f"e.g. move solver.params.{key} into solver.reference.{key} (finer) and solver.source.{key}"
    else:
        how = "set solver.reference.KEY / solver.source.KEY to the arguments that make the reference finer"
    return (
        f"solver: the reference and source instances of '{solver.name}' are built from the same arguments "
        "(solver.params with solver.reference equals solver.params with solver.source), so "
        f"method={method} would train the correction against the solver itself (SRC error 0); make them "
        f"differ, {how}"
    )
