"""Every `deepzero-task pde` command of docs/solvers.md runs as written (sizes capped by overrides
appended after it), with its YAML files written where the doc puts them, the example plug-in
registered as `burgers1d` and on the import path, and a `./bin/heat1d` program for the external one.
Each command runs once per test process: a command whose run a later one starts from (`init_from`) is not
run again for it."""

from __future__ import annotations

import re
import shlex
import shutil
import stat
import sys
import textwrap
from pathlib import Path

import pytest
from npy_programs import NPY_IO

from deepzero_apps.cli import main
from deepzero_apps.solvers import register_solver
from deepzero_apps.solvers.registry import unregister_solver

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "solvers.md").read_text()
CAPS = ["data.train_sims=1", "data.test_sims=1", "data.steps=3", "unroll=2", "epochs=1", "progress=false",
        "estimator=rge", "estimator.q=2", "data.cache_dir=cache"]
# The doc's ./bin/heat1d: `--init SEED --n N --out FILE`, or `--in FILE --out FILE --dt DT` (explicit heat
# step, u_t = 0.02 u_xx on [0, 1) with as many points as the input has).
HEAT1D = f"#!{sys.executable}\n" + NPY_IO + textwrap.dedent("""\
    args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
    if "--init" in args:
        n = int(args.get("--n", 64))
        shape, u = (1, 1, n), [math.sin(2 * math.pi * (i / n + int(args["--init"]) / 7)) for i in range(n)]
    else:
        (shape, u), dt = load(args["--in"]), float(args["--dt"])
        n, r = shape[-1], dt * 0.02 * shape[-1] ** 2
        u = [v + r * (u[k - 1 if k % n else k + n - 1] - 2 * v + u[k + 1 if (k + 1) % n else k + 1 - n])
             for k, v in enumerate(u)]
    save(args["--out"], shape, u)
""")


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", DOC, flags=re.S)


def commands() -> list[list[str]]:
    """Each `deepzero-task pde ...` line of the doc's bash blocks (continuations joined, comments dropped)."""
    found = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("deepzero-task pde"):
                found.append(shlex.split(line, comments=True)[1:])
    return found


def producer(argv: list[str], run_dir: str) -> list[str]:
    """The doc's command, before `argv`, whose run `argv` starts from (`init_from=run_dir`): the same
    experiment with the method named by the directory's last part."""
    experiment = [a for a in argv if a.startswith("experiment=")]
    earlier = commands()[: commands().index(argv)]
    return next(c for c in reversed(earlier) if experiment[0] in c and f"method={Path(run_dir).name}" in c)


def test_the_doc_has_the_commands_this_test_runs():
    assert len(commands()) >= 9 and ["pde", "--config-dir", "my_conf", "solver=heat1d", "method=zo_sol"] in commands()


def is_info(argv: list[str]) -> bool:
    return any(a in ("--help", "--cfg") for a in argv)


def workspace(directory: Path) -> None:
    """`directory` as the doc's commands expect their working directory: the YAML files where the doc
    puts them, and `./bin/heat1d`."""
    for block in blocks("yaml"):
        first, _, body = block.partition("\n")
        if first.startswith("# my_conf/solver/"):
            path = directory / first[2:].strip()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(body)
    heat = directory / "bin" / "heat1d"
    heat.parent.mkdir()
    heat.write_text(HEAT1D)
    heat.chmod(heat.stat().st_mode | stat.S_IXUSR)


@pytest.fixture(scope="module")
def doc_run(tmp_path_factory):
    """`doc_run(argv)` runs the doc's command `argv` (sizes capped, `hydra.run.dir=run`) in a working
    directory of its own, once per module, and returns that directory. A command starting from an earlier
    one's run (`init_from=DIR`) finds that run, made by this same function, copied to DIR."""
    done: dict[tuple[str, ...], Path] = {}

    def run(argv: list[str]) -> Path:
        if tuple(argv) in done:
            return done[tuple(argv)]
        cwd = tmp_path_factory.mktemp("doc")
        workspace(cwd)
        for start in (a.split("=", 1)[1] for a in argv if a.startswith("init_from=")):
            shutil.copytree(run(producer(argv, start)) / "run", cwd / start)  # the earlier command's run
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(cwd)
            mp.syspath_prepend(str(ROOT / "examples" / "burgers1d_plugin"))
            from dz_burgers1d import Burgers1D

            register_solver("burgers1d", Burgers1D)  # in process, as its entry point would register it
            try:
                assert main([*argv, *([] if is_info(argv) else CAPS), "hydra.run.dir=run"]) == 0
            finally:
                unregister_solver("burgers1d")
        done[tuple(argv)] = cwd
        return cwd

    return run


@pytest.mark.parametrize("argv", commands(), ids=lambda argv: " ".join(argv[1:])[:60])
def test_every_command_of_docs_solvers_md_runs_as_written(argv, doc_run):
    if any("phiflow" in a for a in argv):
        pytest.importorskip("phi")
    cwd = doc_run(argv)
    assert is_info(argv) or (cwd / "run" / "eval.json").is_file()


def test_an_import_path_alone_on_the_command_line_is_refused_saying_what_works(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "burgers1d_plugin"))
    assert main(["pde", "solver.name=dz_burgers1d:Burgers1D", f"hydra.run.dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no parameter 'size'" in err and "write a solver config file with name: dz_burgers1d:Burgers1D" in err
    assert len(err.splitlines()) == 1, err
