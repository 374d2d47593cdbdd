"""A reference and a source built from the same arguments (issue #23 item 4): training a correction
against the solver itself is refused in one line; the SRC baseline still runs."""

import pytest
from test_pde import TINY, external_solver_dir

from deepzero_apps.cli import main


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
