"""`deepzero-task pde` end to end on tiny grids: every method, ZO progress, the data cache, errors."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from npy_programs import NPY_IO

from deepzero_apps.checkpoint import load_checkpoint
from deepzero_apps.cli import main
from deepzero_apps.solvers import Solver
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


@pytest.fixture(scope="module")
def src_run(tmp_path_factory) -> SimpleNamespace:
    """`run(..., "method=src")` into a fresh cache, with its stdout: the cache then holds the one held-out
    reference simulation. Tests that start from that cache copy it (`fresh_copy`) and only read the run."""
    root = tmp_path_factory.mktemp("pde_src")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # the console log handler is bound to sys.stdout during the run
        assert run(root / "run", str(root / "cache"), "method=src") == 0
    return SimpleNamespace(dir=root / "run", cache=root / "cache", out=out.getvalue())


def fresh_copy(src_run: SimpleNamespace, cache: Path) -> Path:
    """A cache as the src run left it (its digest key included), for a test to change."""
    shutil.copytree(src_run.cache, cache)
    return cache


@pytest.mark.parametrize("method", ["src", "non", "zo_sol", "fo_sol"])
def test_every_method_runs_through_the_cli(tmp_path, cache, capsys, src_run, method):
    if method == "src":  # src_run is this run: TINY, method=src
        run_dir, out = src_run.dir, src_run.out
    else:
        run_dir = tmp_path
        assert run(run_dir, cache, f"method={method}") == 0
        out = capsys.readouterr().out
    assert "registered solvers: " in out and "burgers" in out
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["method"] == method and len(result["mae_over_time"]) == 4
    assert np.isfinite(result["mae"]) and result["mae_src"] > 0
    for png in ("error_over_time.png", "snapshots.png"):
        assert (run_dir / png).exists(), png
    assert (run_dir / "checkpoint.pt").exists() == (method != "src")
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


def test_eval_every_logs_a_held_out_learning_curve(tmp_path, cache):
    # 2 sims x 3 windows / batch 2 = 3 steps: one held-out evaluation after each, the last one the final result.
    assert run(tmp_path, cache, "method=fo_sol", "eval_every=1") == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [1, 2, 3]
    final = json.loads((tmp_path / "eval.json").read_text())["mae"]
    assert evals[-1]["eval"]["test_mae"] == pytest.approx(final, rel=1e-12)
    assert len({r["eval"]["test_mae"] for r in evals}) == 3  # the net changes between evaluations


def test_reference_simulations_are_cached_and_reused(tmp_path, capsys, src_run):
    cache = str(fresh_copy(src_run, tmp_path / "cache"))  # after method=src into a fresh cache:
    assert "generated 1 reference simulation" in src_run.out
    assert run(tmp_path / "b", cache, "method=non") == 0
    out = capsys.readouterr().out
    assert "reused 1 cached reference simulation" in out  # the held-out one
    assert "generated 2 reference simulation(s)" in out and "reused 0" in out  # training sims are new
    assert run(tmp_path / "c", cache, "method=src", "solver.params.forcing_amplitude=0.2") == 0
    assert "generated 1 reference simulation" in capsys.readouterr().out  # another solver config, another key


def test_help_lists_registered_solvers(capsys):
    assert main(["pde", "--help"]) == 0
    assert "Registered solvers" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("override", "needle"),
    [
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


# ---- solvers selected by name, external programs, the cache ------------------------------------------
EXTERNAL = NPY_IO + """
mode, out = sys.argv[1], sys.argv[-1]
if mode == "init":
    save(out, (1, 1, 16), [math.sin(i * 2 * math.pi / 16 + int(sys.argv[2])) for i in range(16)])
else:
    shape, u = load(sys.argv[2])
    save(out, shape, [RATE * v for v in u])
"""


def external_solver_dir(tmp_path, rate: float):
    """A --config-dir holding `solver=mine`: an external program (rebuilt with another `rate`)."""
    script = tmp_path / "mine.py"
    script.write_text(EXTERNAL.replace("RATE", repr(rate)))
    conf = tmp_path / "conf" / "solver"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "mine.yaml").write_text(
        f"""name: external
params:
  command: [{sys.executable}, {script}, step, "{{input}}", "{{output}}"]
  init_command: [{sys.executable}, {script}, init, "{{seed}}", "{{output}}"]
  grid: {{shape: [1, 16]}}
  channels: [u]
  name: mine
reference: {{}}
source: {{}}
"""
    )
    return str(tmp_path / "conf")


def test_config_dir_external_solver_and_a_rebuilt_program_resimulates(tmp_path, capsys):
    cache, args = str(tmp_path / "cache"), ["method=src", "data.steps=2", "unroll=2"]
    args += ["data.train_sims=1", "data.test_sims=1"]
    conf = external_solver_dir(tmp_path, 0.9)
    assert main(["pde", "--config-dir", conf, "solver=mine", f"hydra.run.dir={tmp_path}/a", f"data.cache_dir={cache}", *args]) == 0
    assert "generated 1 reference simulation" in capsys.readouterr().out
    first = json.loads((tmp_path / "a" / "eval.json").read_text())
    external_solver_dir(tmp_path, 0.5)  # same command line, new program
    assert main(["pde", "--config-dir", conf, "solver=mine", f"hydra.run.dir={tmp_path}/b", f"data.cache_dir={cache}", *args]) == 0
    assert "generated 1 reference simulation" in capsys.readouterr().out
    second = json.loads((tmp_path / "b" / "eval.json").read_text())
    # SRC steps the same program as the reference: exact either way, but the reference itself changed.
    assert first["mae_src"] == 0 and second["mae_src"] == 0
    refs = sorted(Path(cache).glob("external-*.npz"))
    assert len(refs) == 2
    a, b = (np.load(r)["trajectory"] for r in refs)
    assert not np.allclose(a, b)


def test_damaged_cache_file_is_resimulated(tmp_path, capsys, src_run):
    cache = fresh_copy(src_run, tmp_path / "cache")
    files = sorted(cache.glob("burgers-*.npz"))
    assert len(files) == 1
    good = np.load(files[0])["trajectory"]
    files[0].write_bytes(b"\0" * files[0].stat().st_size)  # zeroed, e.g. by a crashed file system
    capsys.readouterr()
    assert run(tmp_path / "b", str(cache), "method=src") == 0
    out = capsys.readouterr().out
    assert "is damaged" in out and "generated 1 reference simulation" in out
    np.testing.assert_array_equal(np.load(files[0])["trajectory"], good)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("solver.conditions.test.nu=-1", "condition nu=-1.0 must be > 0"),
        ("solver.params.dt=1000", "dt=1000 is beyond the stability limit"),
        ("solver=wake solver.conditions.train.re=[0,10]", "condition re=0.0 must be > 0"),
        ("solver.params.viscosity=0.1", "solver 'burgers' has no parameter 'viscosity'; accepted: resolution, size, nu"),
        ("solver.name=wake", "solver 'wake' has no parameter 'velocity_amplitude'"),
        ("solver.params.nu=0.2", "'nu' is a condition of solver 'burgers', set per split"),
        ("solver.conditions.test.re=500", "solver 'burgers' has no condition 're' (its conditions: nu)"),
        ("solver.conditions.test.nu={range:[0.3,0.03]}", "solver.conditions.test.nu.range=[0.3, 0.03] must be"),
        ("solver.conditions.test.nu={range:[0,1],scale:log}", "must be positive for scale=log"),
        ("data.val_sims=2 data.val_seed_start=1", "validation seeds 1..2 overlap"),
    ],
)
def test_meaningless_solver_values_are_one_line_exit_2(tmp_path, cache, capsys, override, needle):
    assert run(tmp_path, cache, *override.split()) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "checkpoint.pt").exists()


def test_solver_group_selects_each_solvers_own_defaults(capsys):
    assert main(["pde", "--cfg", "job", "solver=wake", "solver.params.re=300"]) == 0
    out = capsys.readouterr().out
    assert "re: 300" in out and "resolution: reference" in out and "nu:" not in out


def test_phiflow_wake_runs_fo_sol_through_its_torch_twin(tmp_path, capsys):
    pytest.importorskip("phi")
    args = ["solver=phiflow_wake", "method=fo_sol", "solver.reference.resolution=[16,32]"]
    args += ["solver.source.resolution=[8,16]", "data.train_sims=1", "data.test_sims=1", "data.steps=3"]
    args += ["unroll=2", "progress=false", f"hydra.run.dir={tmp_path}", f"data.cache_dir={tmp_path}/cache"]
    assert main(["pde", *args]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["solver"] == "phiflow_wake" and result["method"] == "fo_sol"
    assert np.isfinite(result["mae"]) and result["mae_src"] > 0


def test_hydra_searchpath_selects_a_solver_config_for_a_real_run(tmp_path):
    conf = external_solver_dir(tmp_path, 0.9)
    args = ["method=src", "data.steps=2", "unroll=1", "data.train_sims=1", "data.test_sims=1", f"data.cache_dir={tmp_path}/cache"]
    assert main(["pde", f"hydra.searchpath=[file://{conf}]", "solver=mine", f"hydra.run.dir={tmp_path}/run", *args]) == 0
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["solver"] == "external"


def _rewrite_cache(path: Path, traj: np.ndarray) -> None:
    """What an editor without the cache's secret can do: new data with its sha256 recomputed, under
    every digest name (the old format stored a plain sha256 next to the data)."""
    import hashlib

    plain = hashlib.sha256(np.ascontiguousarray(traj).tobytes()).hexdigest()
    with open(path, "wb") as f:
        np.savez(f, trajectory=traj, sha256=np.array(plain), hmac_sha256=np.array(plain))


@pytest.mark.parametrize("edit", ["scaled", "nan"])
def test_a_cache_edited_together_with_its_checksum_is_resimulated(tmp_path, capsys, src_run, edit):
    cache = fresh_copy(src_run, tmp_path / "cache")
    first = json.loads((src_run.dir / "eval.json").read_text())
    (path,) = cache.glob("burgers-*.npz")
    good = np.load(path)["trajectory"]
    _rewrite_cache(path, good * 10 if edit == "scaled" else np.full_like(good, np.nan))
    capsys.readouterr()
    assert run(tmp_path / "b", str(cache), "method=src") == 0
    out = capsys.readouterr().out
    assert "is damaged" in out and "generated 1 reference simulation" in out
    assert json.loads((tmp_path / "b" / "eval.json").read_text())["mae_src"] == first["mae_src"]
    np.testing.assert_array_equal(np.load(path)["trajectory"], good)


def test_a_non_finite_metric_is_an_error_not_a_result(tmp_path, capsys, monkeypatch):
    import deepzero_apps.tasks.pde.app as pde_app

    real = pde_app.reference_data

    def nan_reference(*args, **kwargs):
        refs = real(*args, **kwargs)
        refs[:, -1, :, 0, 0] = np.nan  # the last frame is only compared, never stepped: only the metric sees it
        return refs

    monkeypatch.setattr(pde_app, "reference_data", nan_reference)
    assert run(tmp_path, str(tmp_path / "cache"), "method=src") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "non-finite metric mae=nan" in err and "eval.json not written" in err
    assert not (tmp_path / "eval.json").exists()


# ------------------------------------------------------------------------- conditions as data
def test_conditions_split_the_reference_and_the_cache(tmp_path, capsys):
    """Train / validation / test condition sets: a test viscosity outside the training one changes the
    test reference (and its cache entry) but not the training simulations'; eval.json records them."""
    cache = str(tmp_path / "cache")
    val = ["data.val_sims=1"]
    assert run(tmp_path / "a", cache, "method=non", *val) == 0
    assert capsys.readouterr().out.count("reused 0 from cache") == 3  # test, train, validation: all new
    assert run(tmp_path / "b", cache, "method=non", *val, "solver.conditions.test.nu=0.3") == 0
    out = capsys.readouterr().out  # the test simulation is new; training and validation ones are reused
    assert out.count("generated 1 reference simulation(s)") == 1 and "reused 2 cached" in out and "reused 1 cached" in out
    files = sorted(Path(cache).glob("*.npz"))
    assert len(files) == 5
    a, b = (json.loads((tmp_path / d / "eval.json").read_text()) for d in "ab")
    assert a["simulations"]["test"] == [{"seed": 1000, "nu": 0.1}] and b["simulations"]["test"] == [{"seed": 1000, "nu": 0.3}]
    assert a["simulations"]["train"] == b["simulations"]["train"] == [{"seed": 0, "nu": 0.1}, {"seed": 1, "nu": 0.1}]
    assert b["conditions"]["test"] == {"nu": 0.3} and b["conditions"]["train"] == {"nu": 0.1}
    assert a["mae_src"] != b["mae_src"] and a["mae_val"] == b["mae_val"]
    refs = {f.name: np.load(f)["trajectory"] for f in files}
    assert len({r.tobytes() for r in refs.values()}) == 5  # every simulation is a different trajectory
    assert len(a["mae_per_sim"]) == 1 and a["mae"] == pytest.approx(a["mae_per_sim"][0])


def test_condition_sets_draw_ranges_and_cycle_lists():
    from deepzero_apps.solvers.wake import WakeSolver
    from deepzero_apps.tasks.pde.conditions import make_split, resolve_conditions

    sets = resolve_conditions("wake", WakeSolver.condition_defaults, {
        "test": {"re": [{"range": [1500, 3000], "scale": "log"}, {"range": [40, 90], "scale": "log"}, 500]}})
    train = make_split("train", range(8), sets["train"])
    assert all(100 <= v["re"] <= 1000 for v in train.values) and len({v["re"] for v in train.values}) == 8
    # the drawing stream of the first condition is the one the wake used before conditions were data
    u = np.random.default_rng([3, 2]).uniform()
    assert train.values[3]["re"] == pytest.approx(math.exp(math.log(100) + u * (math.log(1000) - math.log(100))), rel=1e-15)
    test = make_split("test", range(1000, 1006), sets["test"])
    re = [v["re"] for v in test.values]
    assert all(1500 <= r <= 3000 for r in re[0::3]) and all(40 <= r <= 90 for r in re[1::3]) and re[2::3] == [500, 500]
    assert make_split("test", range(1000, 1006), sets["test"]) == test  # a function of the seeds


def test_cfg_job_shows_the_three_condition_sets(capsys):
    assert main(["pde", "--cfg", "job", "solver=wake", "solver.conditions.test.re=[2000]"]) == 0
    out = capsys.readouterr().out
    block = out[out.index("  conditions:"):]
    assert "train:" in block and "validation:" in block and "test:" in block and "- 2000" in block
    assert "scale: log" in block


class TwinlessBurgers(BurgersSolver):
    name = "twinless_burgers"
    torch_twin = None


def test_fo_sol_without_a_twin_is_one_line_exit_2(tmp_path, cache, capsys):
    register_solver("twinless_burgers", TwinlessBurgers)
    try:
        assert run(tmp_path, cache, "solver=twinless_burgers", "method=fo_sol") == 2
    finally:
        unregister_solver("twinless_burgers")
    err = capsys.readouterr().err.strip()
    assert "method=fo_sol needs a differentiable torch twin" in err and len(err.splitlines()) == 1, err


def test_fo_sol_runs_on_the_numpy_wake_through_its_torch_twin(tmp_path, cache):
    assert run(tmp_path, cache, "solver=wake", "method=fo_sol", "data.warmup_steps=2") == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["solver"] == "wake" and np.isfinite(result["mae"]) and result["train"]["steps"] >= 1
    assert [s["seed"] for s in result["simulations"]["train"]] == [0, 1]
    assert all(100 <= s["re"] <= 1000 for s in result["simulations"]["train"])


class DampedBurgers(BurgersSolver):
    """A plug-in with a condition of its own: a damping rate applied after every Burgers step."""

    name = "damped_burgers"
    condition_defaults = {**BurgersSolver.condition_defaults, "damping": 0.0}

    def step(self, state, forcing=None, nu=None, damping=0.0, **params):
        return (1.0 - damping) * super().step(state, forcing=forcing, nu=nu)

    def step_batch(self, states, forcing=None, nu=None, damping=0.0, **params):
        return Solver.step_batch(self, states, forcing=forcing, nu=nu, damping=damping)


def test_a_plugin_declares_its_own_conditions(tmp_path, cache, capsys):
    register_solver("damped_burgers", DampedBurgers)
    try:
        assert main(["pde", "--cfg", "job", "solver=damped_burgers"]) == 0
        assert "damping: 0.0" in capsys.readouterr().out
        assert run(tmp_path / "a", cache, "solver=damped_burgers", "method=src") == 0
        assert run(tmp_path / "b", cache, "solver=damped_burgers", "method=src", "solver.conditions.test.damping=[0.2]") == 0
    finally:
        unregister_solver("damped_burgers")
    a, b = (json.loads((tmp_path / d / "eval.json").read_text()) for d in "ab")
    assert b["simulations"]["test"] == [{"seed": 1000, "nu": 0.1, "damping": 0.2}]
    assert a["mae_src"] != b["mae_src"]  # the damped reference and source are other simulations
