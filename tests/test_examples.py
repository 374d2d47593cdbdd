"""Every script in examples/ runs (fast settings through its argv) and reports what it claims."""

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(name: str, *argv: str) -> dict:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(list(argv))


def test_custom_training_loop_counts_d_plus_one_queries_per_step(capsys):
    result = run("custom_training_loop", "--steps", "2", "--batch-size", "8")
    assert result["queries"] == 2 * (result["parameters"] + 1)
    assert 0 < result["forward_equivalents"] < result["queries"], "feature reuse runs partial forwards"
    assert '"example": "custom_training_loop"' in capsys.readouterr().out


def test_zo_function_scipy_learns_the_parameters_through_the_solver():
    result = run("zo_function_scipy", "--steps", "4", "--batch-size", "8")
    assert result["solver_queries"] == 4 * (2 * 2 + 1)  # central CGE over 2 parameters per sample
    assert result["param_error"] < result["param_error_before"]


def test_custom_estimator_points_along_backprop():
    result = run("custom_estimator", "--steps", "2")
    assert result["cosine_to_backprop"] > 0.8
