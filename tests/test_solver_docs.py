"""Every `deepzero-task pde` command of docs/solvers.md runs as written (sizes capped by overrides
appended after it), with its YAML files written where the doc puts them, the example plug-in
registered as `burgers1d` and on the import path, and a `./bin/heat1d` program for the external one."""

from __future__ import annotations

import re
import shlex
import stat
import sys
import textwrap
from pathlib import Path

import pytest

from deepzero_apps.cli import main
from deepzero_apps.solvers import register_solver
from deepzero_apps.solvers.registry import unregister_solver

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "solvers.md").read_text()
CAPS = ["data.train_sims=1", "data.test_sims=1", "data.steps=3", "unroll=2", "epochs=1", "progress=false",
        "estimator=rge", "estimator.q=2", "data.cache_dir=cache"]
HEAT1D = textwrap.dedent(f"""\
    #!{sys.executable}
    # The doc's ./bin/heat1d: `--init SEED --n N --out FILE`, or `--in FILE --out FILE --dt DT` (explicit
    # heat step, u_t = 0.02 u_xx on [0, 1) with as many points as the input has).
    import sys
    import numpy as np
    args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
    if "--init" in args:
        x = np.linspace(0, 1, int(args.get("--n", 64)), endpoint=False)
        u = np.sin(2 * np.pi * (x + int(args["--init"]) / 7))[None, None]
    else:
        u, dt = np.load(args["--in"]), float(args["--dt"])
        u = u + dt * 0.02 * u.shape[-1] ** 2 * (np.roll(u, 1, -1) - 2 * u + np.roll(u, -1, -1))
    np.save(args["--out"], u)
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


@pytest.mark.parametrize("argv", commands(), ids=lambda argv: " ".join(argv[1:])[:60])
def test_every_command_of_docs_solvers_md_runs_as_written(argv, tmp_path, monkeypatch):
    if any("phiflow" in a for a in argv):
        pytest.importorskip("phi")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "burgers1d_plugin"))
    for block in blocks("yaml"):
        first, _, body = block.partition("\n")
        if first.startswith("# my_conf/solver/"):
            path = tmp_path / first[2:].strip()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(body)
    heat = tmp_path / "bin" / "heat1d"
    heat.parent.mkdir()
    heat.write_text(HEAT1D)
    heat.chmod(heat.stat().st_mode | stat.S_IXUSR)
    from dz_burgers1d import Burgers1D  # the plug-in, registered in process as its entry point would be

    register_solver("burgers1d", Burgers1D)
    try:
        info = any(a in ("--help", "--cfg") for a in argv)
        for start in (a.split("=", 1)[1] for a in argv if a.startswith("init_from=")):
            assert main([*producer(argv, start), *CAPS, f"hydra.run.dir={start}"]) == 0  # the doc's earlier command
        assert main([*argv, *([] if info else CAPS), "hydra.run.dir=run"]) == 0
    finally:
        unregister_solver("burgers1d")
    assert info or (tmp_path / "run" / "eval.json").is_file()


def test_an_import_path_alone_on_the_command_line_is_refused_saying_what_works(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "burgers1d_plugin"))
    assert main(["pde", "solver.name=dz_burgers1d:Burgers1D", f"hydra.run.dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no parameter 'size'" in err and "write a solver config file with name: dz_burgers1d:Burgers1D" in err
    assert len(err.splitlines()) == 1, err
