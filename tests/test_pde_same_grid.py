"""A reference and a source built from the same arguments (issue #23 item 4): training a correction
against the solver itself is refused in one line; the SRC baseline still runs."""

import pytest
from test_pde import TINY, NanBurgers, external_solver_dir

from deepzero_apps.cli import main
from deepzero_apps.solvers.registry import register_solver, unregister_solver


@pytest.mark.parametrize(
    ("solver", "needle"),
    [
        (["solver.reference.resolution=[16,16]", "solver.source.resolution=[16,16]"],
         "e.g. solver.reference.resolution finer than solver.source.resolution"),
        (["solver=mine"], "e.g. move solver.params.grid into solver.reference.grid (finer) and solver.source.grid"),
    ],
)
@pytest.mark.parametrize("method", ["zo_sol", "non"])
def test_same_reference_and_source_is_refused_for_training(tmp_path, capsys, solver, needle, method):
    conf = external_solver_dir(tmp_path, 0.9)
    code = main(["pde", "--config-dir", conf, f"hydra.run.dir={tmp_path}/run", f"data.cache_dir={tmp_path}/cache",
                 *(o for o in TINY if not o.startswith("solver.")), *solver, f"method={method}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "are built from the same arguments" in err and f"method={method} would train" in err and needle in err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run" / "checkpoint.pt").exists()


def test_instances_that_only_look_alike_are_warned_about_in_one_line(tmp_path, capsys):
    """Same grid and dt, differing in an argument describe() does not show: a warning, not a refusal."""
    register_solver("nan_burgers", NanBurgers)
    try:
        code = main(["pde", f"hydra.run.dir={tmp_path}/run", f"data.cache_dir={tmp_path}/cache",
                     *(o for o in TINY if not o.startswith("solver.")), "solver.name=nan_burgers", "method=src",
                     "solver.reference.resolution=[8,8]", "solver.source.resolution=[8,8]",
                     "+solver.source.nan_after=1000"])
    finally:
        unregister_solver("nan_burgers")
    assert code == 0
    warned = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(warned) == 1 and "describe themselves identically (grid [8, 8]" in warned[0], warned
    assert "they differ only in nan_after" in warned[0]
