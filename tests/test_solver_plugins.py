"""Solver plug-ins: entry points, Hydra ``_target_``, ``register_solver`` and ``ExternalSolver``."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from deepzero_apps.solvers import (
    ENTRY_POINT_GROUP,
    Solver,
    SolverError,
    create_solver,
    get_solver_class,
    list_solvers,
    register_solver,
)
from deepzero_apps.solvers.external import ExternalSolver
from deepzero_apps.solvers.registry import unregister_solver

PLUGIN_SRC = Path(__file__).resolve().parent / "plugin_pkg"


def _write_dist(root: Path, dist: str, entry_points: dict[str, str]) -> None:
    """A minimal installed distribution: ``<dist>-0.1.dist-info`` with METADATA and entry_points.txt."""
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = [f"[{ENTRY_POINT_GROUP}]"] + [f"{k} = {v}" for k, v in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def plugin_on_path(tmp_path, monkeypatch):
    site = tmp_path / "site"
    _write_dist(
        site,
        "dz_solver_plugin_demo",
        {"demo_decay": "dz_solver_plugin_demo:DecaySolver", "demo_broken": "dz_no_such_module_xyz:Solver"},
    )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.syspath_prepend(str(PLUGIN_SRC))
    return site


# ------------------------------------------------------------------------------- entry points
def test_entry_point_plugin_is_listed_and_runs(plugin_on_path):
    names = list_solvers()
    assert "demo_decay" in names and "burgers" in names
    solver = create_solver("demo_decay", resolution=6, rate=0.5, dt=0.1)
    assert isinstance(solver, Solver) and type(solver).__name__ == "DecaySolver"
    x = solver.initial_state(0)
    traj = solver.rollout(x, 3)
    np.testing.assert_allclose(traj[-1], x * 0.95**3)


def test_broken_entry_point_fails_only_when_used(plugin_on_path):
    assert "demo_broken" in list_solvers()
    with pytest.raises(ImportError, match=r"solver plug-in 'demo_broken'.*dz_solver_plugin_demo"):
        create_solver("demo_broken")


def test_plugin_absent_without_its_distribution():
    assert "demo_decay" not in list_solvers()
    with pytest.raises(ValueError, match="unknown solver 'demo_decay'"):
        create_solver("demo_decay")


def test_register_solver_decorator():
    @register_solver("test_inline_decay")
    class Inline(Solver):
        channels = ("q",)

        def __init__(self, n: int = 4):
            from deepzero_apps.solvers import Grid

            self.grid = Grid(shape=(n, n))

        def initial_state(self, seed, **params):
            return np.ones(self.state_shape)

        def step(self, state, forcing=None, **params):
            return 0.5 * state

    try:
        assert "test_inline_decay" in list_solvers()
        assert get_solver_class("test_inline_decay") is Inline
        s = create_solver("test_inline_decay", n=3)
        assert s.step(s.initial_state(0)).sum() == pytest.approx(4.5)
        with pytest.raises(ValueError, match="already registered"):
            register_solver("test_inline_decay", lambda: None)
    finally:
        unregister_solver("test_inline_decay")


# ---------------------------------------------------------------------------------- Hydra
def test_hydra_target_instantiation(plugin_on_path):
    solver = instantiate(
        {"_target_": "deepzero_apps.solvers.burgers.BurgersSolver", "resolution": 8, "nu": 0.05}
    )
    assert solver.grid.shape == (8, 8) and solver.nu == 0.05
    x = solver.step(solver.initial_state(1), **solver.conditions(1))
    assert np.isfinite(x).all()
    cfg = OmegaConf.create({"_target_": "dz_solver_plugin_demo.DecaySolver", "resolution": 4})
    plugin = instantiate(cfg)
    np.testing.assert_allclose(plugin.step(np.ones((1, 4, 4))), 0.95)
    wake = create_solver({"_target_": "deepzero_apps.solvers.wake.WakeSolver", "resolution": 32})
    assert wake.grid.shape == (16, 32)
    assert create_solver({"name": "burgers", "resolution": 4}).grid.shape == (4, 4)
    assert create_solver("deepzero_apps.solvers.burgers:BurgersSolver", resolution=4).grid.shape == (4, 4)


# ------------------------------------------------------------------------------ ExternalSolver
EXTERNAL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import numpy as np

    mode, inp, out = sys.argv[1], sys.argv[2], sys.argv[3]
    if mode == "init":
        seed = int(inp)
        np.save(out, np.full((2, 4, 6), float(seed)))
        sys.exit(0)
    x = np.load(inp)
    if mode == "ok":
        np.save(out, 0.5 * x + 1.0)
    elif mode == "crash":
        print("reading input ... ok", file=sys.stderr)
        print("FATAL: matrix is singular at row 7", file=sys.stderr)
        sys.exit(3)
    elif mode == "sleep":
        with open(sys.argv[4], "w") as f:
            f.write(str(__import__("os").getpid()))
        time.sleep(60)
    elif mode == "nan":
        x[1, 2, 3] = np.nan
        np.save(out, x)
    elif mode == "shape":
        np.save(out, x[:, :, :-1])
    elif mode == "garbage":
        open(out, "w").write("this is not an npy file")
    elif mode == "stdio":
        import io
        x = np.load(io.BytesIO(sys.stdin.buffer.read()))
        buf = io.BytesIO()
        np.save(buf, x * 2.0)
        sys.stdout.buffer.write(buf.getvalue())
    # mode == "silent": exits 0 without writing anything
    """
)

GRID = {"shape": [4, 6], "size": [1.0, 1.5]}


@pytest.fixture
def ext(tmp_path):
    script = tmp_path / "legacy_solver.py"
    script.write_text(EXTERNAL_SCRIPT)
    work = tmp_path / "work"
    work.mkdir()
    saved = tmp_path / "saved_outputs"
    saved.mkdir()
    np.save(saved / "trajectory.npy", np.arange(12.0))
    (work / "checkpoint.txt").write_text("epoch 3")

    def make(mode: str, **kw) -> ExternalSolver:
        args = [sys.executable, str(script), mode, "{input}", "{output}", *kw.pop("extra_args", [])]
        kw.setdefault("timeout", 20.0)
        return ExternalSolver(args, grid=GRID, channels=("u", "v"), workdir=work, name=f"legacy-{mode}", **kw)

    make.tmp_path = tmp_path
    make.work = work
    make.saved = saved
    make.script = script
    return make


def _assert_outputs_intact(ext) -> None:
    np.testing.assert_array_equal(np.load(ext.saved / "trajectory.npy"), np.arange(12.0))
    assert (ext.work / "checkpoint.txt").read_text() == "epoch 3"
    assert not [p for p in ext.work.iterdir() if p.name.startswith("dz_")]  # temp dirs cleaned up


def test_external_solver_runs(ext):
    solver = ext("ok", init_command=[sys.executable, str(ext.script), "init", "{seed}", "{output}"])
    x0 = solver.initial_state(5)
    assert x0.shape == (2, 4, 6) and np.all(x0 == 5.0)
    x1 = solver.step(x0)
    np.testing.assert_allclose(x1, 3.5)
    np.testing.assert_allclose(solver.step(x1), 2.75)
    assert solver.calls == 2
    _assert_outputs_intact(ext)


def test_external_solver_stdio_and_initial_state_file(ext):
    init = ext.tmp_path / "init_7.npy"
    np.save(init, np.ones((2, 4, 6)))
    solver = ext("stdio", io="stdio", initial_state_file=str(ext.tmp_path / "init_{seed}.npy"))
    np.testing.assert_allclose(solver.step(solver.initial_state(7)), 2.0)
    with pytest.raises(SolverError, match="initial state file .* does not exist"):
        solver.initial_state(8)


def test_external_solver_via_hydra(ext):
    cfg = OmegaConf.create(
        {
            "_target_": "deepzero_apps.solvers.external.ExternalSolver",
            "command": [sys.executable, str(ext.script), "ok", "{input}", "{output}"],
            "grid": GRID,
            "channels": ["u", "v"],
            "timeout": 20,
        }
    )
    solver = instantiate(cfg)
    np.testing.assert_allclose(solver.step(np.zeros((2, 4, 6))), 1.0)


def _one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_external_crash(ext):
    with pytest.raises(SolverError) as e:
        ext("crash").step(np.zeros((2, 4, 6)))
    msg = _one_line_error(e)
    assert "legacy-crash" in msg and "step 1" in msg and "exited with code 3" in msg
    assert "FATAL: matrix is singular at row 7" in msg
    _assert_outputs_intact(ext)


def test_external_timeout_kills_process(ext):
    pid_file = ext.tmp_path / "child.pid"
    solver = ext("sleep", timeout=1.0, extra_args=[str(pid_file)])
    t0 = time.monotonic()
    with pytest.raises(SolverError) as e:
        solver.step(np.zeros((2, 4, 6)))
    assert time.monotonic() - t0 < 10.0
    msg = _one_line_error(e)
    assert "legacy-sleep" in msg and "timed out after 1 s" in msg and "killed" in msg
    if pid_file.exists() and pid_file.read_text().strip():
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid_file.read_text()), 0)
    _assert_outputs_intact(ext)


@pytest.mark.parametrize(
    ("mode", "pattern"),
    [
        ("nan", r"step 1: output contains non-finite values \(1 NaN"),
        ("shape", r"step 1: output has shape \(2, 4, 5\), expected \(2, 4, 6\)"),
        ("silent", r"step 1: command exited normally but did not write the output file"),
        ("garbage", r"step 1: cannot read output.npy as .npy"),
    ],
)
def test_external_bad_outputs(ext, mode, pattern):
    with pytest.raises(SolverError, match=pattern) as e:
        ext(mode).step(np.zeros((2, 4, 6)))
    assert f"legacy-{mode}" in _one_line_error(e)
    _assert_outputs_intact(ext)


def test_external_input_and_config_errors(ext, tmp_path):
    solver = ext("ok")
    with pytest.raises(SolverError, match="input state has shape"):
        solver.step(np.zeros((2, 4, 4)))
    with pytest.raises(SolverError, match="no init_command or initial_state_file"):
        solver.initial_state(0)
    missing = ExternalSolver([str(tmp_path / "no_such_binary"), "{input}"], grid=GRID, channels=("u", "v"))
    with pytest.raises(SolverError, match="cannot start"):
        missing.step(np.zeros((2, 4, 6)))
    with pytest.raises(ValueError, match="argument list"):
        ExternalSolver("python solver.py {input} {output}", grid=GRID)


def test_external_timeout_kills_children_that_called_setsid(tmp_path):
    # The step forks a grandchild that leaves the process group with setsid() and sleeps.
    script = tmp_path / "escape.py"
    pid_file = tmp_path / "escaped.pid"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, time
            if os.fork() == 0:
                os.setsid()
                open({str(pid_file)!r}, "w").write(str(os.getpid()))
                time.sleep(120)
            time.sleep(120)
            """
        )
    )
    solver = ExternalSolver([sys.executable, str(script)], grid=GRID, channels=("u", "v"), timeout=2.0)
    with pytest.raises(SolverError, match="timed out"):
        solver.step(np.zeros((2, 4, 6)))
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except FileNotFoundError:
            state = "gone"
        if state in ("gone", "Z", "X"):
            break
        time.sleep(0.05)
    assert state in ("gone", "Z", "X"), f"the setsid() child {pid} survived the timeout (state {state})"


def test_external_environment_is_an_allow_list(tmp_path, monkeypatch):
    monkeypatch.setenv("DZ_TEST_SECRET", "hunter2")
    monkeypatch.setenv("DZ_TEST_PASSED", "copied")
    dump = tmp_path / "env.txt"
    code = (
        f"import json, os, sys, numpy as np; open({str(dump)!r}, 'w').write(json.dumps(dict(os.environ)));"
        " np.save(sys.argv[2], np.load(sys.argv[1]))"
    )
    solver = ExternalSolver(
        [sys.executable, "-c", code, "{input}", "{output}"],
        grid=GRID,
        channels=("u", "v"),
        env={"SOLVER_MODE": "fast", "DZ_TEST_PASSED": None},
    )
    solver.step(np.zeros((2, 4, 6)))
    env = json.loads(dump.read_text())
    assert "DZ_TEST_SECRET" not in env and "hunter2" not in dump.read_text()
    assert env["SOLVER_MODE"] == "fast" and env["DZ_TEST_PASSED"] == "copied"
    assert env["PATH"] == os.environ["PATH"]


def test_external_name_is_the_solvers_own_argument():
    solver = create_solver("external", command=["true"], grid=GRID, name="heat1d")
    assert solver.name == "heat1d"


def test_every_solver_has_a_config_node_with_its_own_defaults(plugin_on_path):
    from deepzero_apps.solvers import solver_config

    burgers = solver_config("burgers")
    assert burgers["reference"] == {"resolution": [64, 64]} and burgers["params"]["size"] == 32.0
    assert "nu" not in burgers["params"]  # a condition: set per split
    assert burgers["conditions"] == {split: {"nu": 0.1} for split in ("train", "validation", "test")}
    demo = solver_config("demo_decay")  # defaults from the plug-in's signature: no Burgers leftovers
    no_conditions = {split: {} for split in ("train", "validation", "test")}
    assert demo == {"name": "demo_decay", "params": {"resolution": 8, "rate": 0.5, "dt": 0.1}, "reference": {},
                    "source": {}, "conditions": no_conditions}
    assert solver_config("external")["params"]["command"] == "???"  # required: must be set


# ------------------------------------------------------------------ the example plug-in, installed
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "burgers1d_plugin"


def test_example_plugin_installs_and_trains_through_the_cli(tmp_path, monkeypatch):
    """pip-installs examples/burgers1d_plugin (a real dist-info with its entry point) and runs
    `deepzero-task pde solver=burgers1d method=zo_sol` on its 1-D grid, end to end. The CLI runs in this
    process with the install target first on sys.path, as PYTHONPATH puts it there, and the plug-in module
    imported afresh: the run finds it only through the installed entry point."""
    import shutil

    from deepzero_apps.cli import main

    src, site = tmp_path / "src", tmp_path / "site"
    shutil.copytree(EXAMPLE, src)  # building writes build/ and *.egg-info next to the sources
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site)]
    subprocess.run([*pip, str(src)], check=True, timeout=600)
    monkeypatch.syspath_prepend(str(site))
    args = ["pde", "solver=burgers1d", "method=zo_sol", "data.train_sims=1", "data.test_sims=1", "data.steps=4"]
    args += ["unroll=2", "progress=false", f"hydra.run.dir={tmp_path}/run", f"data.cache_dir={tmp_path}/cache"]
    earlier = sys.modules.pop("dz_burgers1d", None)  # another test may have imported the example's sources
    try:
        assert main(args) == 0
        assert Path(sys.modules["dz_burgers1d"].__file__).is_relative_to(site)  # the installed copy
    finally:
        sys.modules.pop("dz_burgers1d", None)
        if earlier is not None:
            sys.modules["dz_burgers1d"] = earlier
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert result["solver"] == "burgers1d" and result["source_grid"] == [1, 32] and result["reference_grid"] == [1, 128]
    assert np.isfinite(result["mae"]) and result["train"]["queries"] > 0


def test_fingerprint_sees_an_edited_constant_imported_from_a_sibling_module(tmp_path, monkeypatch):
    # `from .consts import SCALE` binds a float, which names no module: only hashing the whole
    # package notices that consts.py changed (a stale reference cache was reused before).
    pkg = tmp_path / "dz_fp_consts_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "consts.py").write_text("SCALE = 0.5\n")
    (pkg / "solver.py").write_text(textwrap.dedent(
        """
        import numpy as np
        from deepzero_apps.solvers import Grid, Solver
        from .consts import SCALE

        class Scaled(Solver):
            name = "scaled"
            channels = ("q",)

            def __init__(self):
                self.grid = Grid(shape=(2, 2), size=(1.0, 1.0))
                self.dt = 1.0

            def initial_state(self, seed, **params):
                return np.ones(self.state_shape)

            def step(self, state, forcing=None, **params):
                return state * SCALE
        """
    ))
    monkeypatch.syspath_prepend(str(tmp_path))
    solver = create_solver("dz_fp_consts_pkg.solver:Scaled")
    before = solver.fingerprint()
    assert solver.fingerprint() == before  # stable while nothing changes
    (pkg / "consts.py").write_text("SCALE = 0.25\n")
    assert solver.fingerprint()["source"] != before["source"]


def test_fingerprint_hashes_the_executable_found_on_the_solvers_own_path(tmp_path, monkeypatch):
    # The program is found through params.env PATH, not the caller's: a rebuilt binary must change the key.
    bindir = tmp_path / "solver_bin"
    bindir.mkdir()
    program = bindir / "dz_fp_stepper"

    def build(factor: float) -> None:
        program.write_text(f"#!{sys.executable}\nimport sys, numpy as np\n"
                           f"np.save(sys.argv[2], np.load(sys.argv[1]) * {factor})\n")
        program.chmod(0o755)

    build(2.0)
    monkeypatch.setenv("PATH", os.defpath)  # the caller's PATH does not hold it
    solver = ExternalSolver(["dz_fp_stepper", "{input}", "{output}"], grid=GRID, channels=("u", "v"),
                            env={"PATH": f"{bindir}{os.pathsep}{os.defpath}"})
    np.testing.assert_allclose(solver.step(np.ones((2, 4, 6))), 2.0)  # it really runs from there
    before = solver.fingerprint()
    assert "dz_fp_stepper" in before["files"]
    build(3.0)
    np.testing.assert_allclose(solver.step(np.ones((2, 4, 6))), 3.0)
    assert solver.fingerprint()["files"] != before["files"]


def _wait_gone(pid: int, seconds: float = 10.0) -> str:
    """The process's state once it is gone or a zombie (a reparented child PID 1 has not reaped), or its live state."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return "gone"
        if state in ("Z", "X") or time.monotonic() > deadline:
            return state
        time.sleep(0.05)


# A step that succeeds but leaves background `sleep`s behind (their own stdout, so the step returns).
SPAWNING_STEP = """
import subprocess, sys, numpy as np
pids = [subprocess.Popen(["sleep", "300"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid for _ in range(3)]
open(sys.argv[3], "a").write("".join(f"{p}\\n" for p in pids))
np.save(sys.argv[2], np.load(sys.argv[1]))
"""


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs Linux /proc")
def test_a_successful_step_leaves_no_background_process_behind(tmp_path):
    script, pids = tmp_path / "spawn.py", tmp_path / "pids.txt"
    script.write_text(SPAWNING_STEP)
    solver = ExternalSolver([sys.executable, str(script), "{input}", "{output}", str(pids)], grid=GRID,
                            channels=("u", "v"), timeout=30)
    try:
        for _ in range(2):
            np.testing.assert_allclose(solver.step(np.ones((2, 4, 6))), 1.0)
        left = [int(p) for p in pids.read_text().split()]
        assert len(left) == 6
        assert [p for p in left if _wait_gone(p, 3) not in ("gone", "Z", "X")] == []
    finally:
        for pid in map(int, pids.read_text().split()) if pids.exists() else ():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


# The run: one ExternalSolver step of a program that starts a child and then hangs.
HANGING_RUN = """
import sys, numpy as np
from deepzero_apps.solvers.external import ExternalSolver
code = ("import subprocess, sys, time; p = subprocess.Popen(['sleep', '300']); "
        "open(sys.argv[1], 'w').write(f'{__import__(\\\"os\\\").getpid()} {p.pid}\\\\n'); time.sleep(300)")
ExternalSolver([sys.executable, "-c", code, sys.argv[1]], grid={"shape": [2, 2]}, timeout=300).step(np.zeros((1, 2, 2)))
"""


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs Linux /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_run_terminated_mid_step_takes_its_solver_processes_with_it(tmp_path, sig):
    script, pids = tmp_path / "run.py", tmp_path / "pids.txt"
    script.write_text(HANGING_RUN)
    run = subprocess.Popen([sys.executable, str(script), str(pids)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (pids.exists() and pids.read_text().endswith("\n")):
            assert run.poll() is None and time.monotonic() < deadline, run.stderr.read()
            time.sleep(0.05)
        program, child = map(int, pids.read_text().split())
        run.send_signal(sig)
        assert run.wait(timeout=30) == -sig  # it still dies of the signal
        assert _wait_gone(program) in ("gone", "Z", "X"), "the solver program survived the run"
        if sig == signal.SIGTERM:  # SIGKILL cannot be caught: only the program itself dies (PDEATHSIG)
            assert _wait_gone(child) in ("gone", "Z", "X"), "the solver's child survived the run"
    finally:
        if run.poll() is None:
            run.kill()
        for pid in map(int, pids.read_text().split()) if pids.exists() else ():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


# A solver program that floods stdout and stderr (100 MiB each) and then fails.
FLOOD = """
import sys
for _ in range(1600):
    sys.stdout.buffer.write(b"o" * 65536)
    sys.stderr.buffer.write(b"e" * 65535 + b"\\n")
sys.stderr.write("FATAL: the last line\\n")
sys.exit(3)
"""
# The run: one step of the program in argv[1]; prints the error and the growth of its peak RSS in MiB.
FLOODED_RUN = """
import resource, sys
import numpy as np
from deepzero_apps.solvers.external import ExternalSolver, SolverError
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    ExternalSolver([sys.executable, sys.argv[1]], grid={"shape": [2, 2]}, timeout=120).step(np.zeros((1, 2, 2)))
except SolverError as exc:
    print(exc)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_a_program_flooding_stdout_and_stderr_costs_the_run_no_memory(tmp_path):
    """200 MiB of output used to be buffered whole in the run (its peak RSS grew by as much)."""
    program, run = tmp_path / "flood.py", tmp_path / "run.py"
    program.write_text(FLOOD)
    run.write_text(FLOODED_RUN)
    done = subprocess.run([sys.executable, str(run), str(program)], capture_output=True, text=True, timeout=300)
    error, grown = done.stdout.strip().splitlines()
    assert error.endswith("exited with code 3: FATAL: the last line"), done.stderr
    assert int(grown) < 64, f"the run's peak RSS grew by {grown} MiB"


def test_stdio_output_longer_than_the_expected_array_is_refused(tmp_path):
    """A program writing 200 MiB to stdout is killed once past a float64 .npy of the state's shape."""
    code = "import sys\nfor _ in range(3200): sys.stdout.buffer.write(b'x' * 65536)"
    solver = ExternalSolver([sys.executable, "-c", code], grid=GRID, channels=("u", "v"), io="stdio", timeout=120)
    with pytest.raises(SolverError) as e:
        solver.step(np.zeros((2, 4, 6)))
    assert _one_line_error(e).endswith(f"command wrote more than {8 * 48 + 65536:,} bytes to stdout, more than a "
                                       "float64 .npy of the expected shape (process killed)")
