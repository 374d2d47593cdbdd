"""`deepzero-task pde` end to end on tiny grids: every method, ZO progress, the data cache, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deepzero_apps.checkpoint import load_checkpoint
from deepzero_apps.cli import main
from deepzero_apps.solvers.burgers import BurgersSolver
from deepzero_apps.solvers.registry import register_solver, unregister_solver

TINY = [
    "solver.reference.resolution=[16,16]",
    "solver.source.resolution=[8,8]",
    "data.train_sims=2",
    "data.test_sims=1",
    "data.steps=4",
    "unroll=2",
    "model.width=2",
    "model.kernel_size=3",
    "epochs=1",
    "batch_size=2",
    "progress=false",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("pde_cache"))


def run(tmp_path, cache: str, *overrides: str) -> int:
    return main(["pde", f"hydra.run.dir={tmp_path}", f"data.cache_dir={cache}", *TINY, *overrides])


@pytest.mark.parametrize("method", ["src", "non", "zo_sol", "fo_sol"])
def test_every_method_runs_through_the_cli(tmp_path, cache, capsys, method):
    assert run(tmp_path, cache, f"method={method}") == 0
    out = capsys.readouterr().out
    assert "registered solvers: " in out and "burgers" in out
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["method"] == method and len(result["mae_over_time"]) == 4
    assert np.isfinite(result["mae"]) and result["mae_src"] > 0
    for png in ("error_over_time.png", "snapshots.png"):
        assert (tmp_path / png).exists(), png
    assert (tmp_path / "checkpoint.pt").exists() == (method != "src")
    if method == "zo_sol":  # sparse CGE: a subset of coordinates plus the base query per step
        assert 1 < result["train"]["queries"] < result["parameters"]


def test_zo_sol_decreases_its_rollout_loss(tmp_path, cache):
    # One training simulation, all three windows in every batch: the logged loss is the full training loss.
    args = [
        "method=zo_sol",
        "data.train_sims=1",
        "batch_size=3",
        "epochs=5",
        "log_every=1",
        "sparsity.method=dense",
        "optimizer.lr=0.003",
        "scheduler=constant",
    ]
    assert run(tmp_path, cache, *args) == 0
    losses = [
        r["loss"]
        for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
        if r["kind"] == "train"
    ]
    assert len(losses) == 5
    assert losses[-1] < 0.85 * losses[0] and min(losses) == losses[-1], losses


def test_reference_simulations_are_cached_and_reused(tmp_path, capsys):
    cache = str(tmp_path / "cache")
    assert run(tmp_path / "a", cache, "method=src") == 0
    assert "generated 1 reference simulation" in capsys.readouterr().out
    assert run(tmp_path / "b", cache, "method=non") == 0
    out = capsys.readouterr().out
    assert "reused 1 cached reference simulation" in out  # the held-out one
    assert "generated 2 reference simulation(s)" in out and "reused 0" in out  # training sims are new
    assert run(tmp_path / "c", cache, "method=src", "solver.params.nu=0.2") == 0
    assert "generated 1 reference simulation" in capsys.readouterr().out  # another solver config, another key


def test_help_lists_registered_solvers(capsys):
    assert main(["pde", "--help"]) == 0
    assert "Registered solvers" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("method=fo_sol solver=wake", "method=fo_sol needs a differentiable torch twin"),
        ("method=sol", "method='sol' is unknown"),
        ("mode=fo", "mode='fo' is not used by pde"),
        ("solver.name=heat", "unknown solver 'heat'"),
        ("unroll=9", "unroll=9"),
        ("data.test_seed_start=1", "held out"),
    ],
)
def test_bad_configuration_is_one_line_exit_2(tmp_path, cache, capsys, override, needle):
    assert run(tmp_path, cache, *override.split()) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


class NanBurgers(BurgersSolver):
    """Burgers that starts returning NaN after `nan_after` steps (a black box failing mid-training)."""

    name = "nan_burgers"

    def __init__(self, nan_after: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.nan_after, self.calls = nan_after, 0

    def step(self, state, forcing=None, **params):
        self.calls += 1
        out = super().step(state, forcing=forcing, **params)
        return out * np.nan if self.nan_after is not None and self.calls > self.nan_after else out


def test_solver_nan_mid_training_is_a_clear_error_and_keeps_the_checkpoint(tmp_path, cache, capsys):
    register_solver("nan_burgers", NanBurgers)
    try:
        # 4 steps of SRC evaluation, then ~100 solver calls per ZO step: fails during the second step.
        code = run(
            tmp_path,
            cache,
            "method=zo_sol",
            "solver.name=nan_burgers",
            "+solver.source.nan_after=150",
            "checkpoint_every=1",
            "epochs=3",
        )
    finally:
        unregister_solver("nan_burgers")
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "solver 'nan_burgers'" in err and "non-finite" in err and "last good checkpoint" in err
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["global_step"] >= 1 and all(np.isfinite(v.numpy()).all() for v in state["model"].values())
