"""Issue 24 item 8: inputs that used to give a traceback are one line (exit 2)."""

from __future__ import annotations

import json

import pytest

from deepzero_apps.cli import main
from deepzero_apps.solvers import register_solver


def test_compare_with_a_header_only_certify_tsv_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"mode": "mse", "train": {"queries": 0}}))
    (run / "certify.tsv").write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n")
    assert main(["certify", f"hydra.run.dir={tmp_path / 'out'}", f"compare=[{run}]"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"compare: {run} is not a finished certify run" in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("name", ["a/b", "", "../x", "a b"])
def test_a_solver_name_that_cannot_be_a_config_option_is_refused(name):
    with pytest.raises(ValueError, match="must be letters, digits"):
        register_solver(name, lambda **kw: None)


def test_complex_solver_output_is_refused_not_cast():
    import numpy as np

    from deepzero_apps.solvers import SolverError, check_state

    with pytest.raises(SolverError, match=r"solver 'heat' step 3: state is complex \(complex128\); return real values"):
        check_state("heat", np.ones((1, 4, 4)) * (1 + 1j), (1, 4, 4), step=3)
    assert check_state("heat", np.ones((1, 4, 4), dtype=np.float32), (1, 4, 4)).dtype == np.float64
