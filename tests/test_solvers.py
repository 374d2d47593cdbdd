"""Numerics of the built-in PDE solvers (Burgers, its torch twin, wake) and the Solver helpers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from deepzero_apps.solvers import Grid, Solver, SolverError, check_state, create_solver, list_solvers
from deepzero_apps.solvers.burgers import BurgersSolver
from deepzero_apps.solvers.registry import BUILTINS
from deepzero_apps.solvers.wake import WakeSolver


@pytest.fixture(scope="module")
def wake() -> WakeSolver:
    return WakeSolver("source")


# --------------------------------------------------------------------------------------- Burgers
def test_burgers_diffusion_matches_implicit_scheme_rate():
    n, size, nu, dt, steps = 16, 32.0, 0.1, 0.1, 40
    solver = BurgersSolver(resolution=n, size=size, nu=nu, dt=dt, advection=False)
    yy, xx = solver.grid.cell_centers()
    ky, kx = 2, 3
    phase = 2 * math.pi * (kx * xx + ky * yy) / size
    u0 = np.stack([np.sin(phase), 0.5 * np.cos(phase)])
    u = u0
    for _ in range(steps):
        u = solver.step(u)
    h = size / n
    lam = 4 * math.sin(math.pi * kx / n) ** 2 / h**2 + 4 * math.sin(math.pi * ky / n) ** 2 / h**2
    expected = (1.0 + dt * nu * lam) ** (-steps)
    np.testing.assert_allclose(u, expected * u0, rtol=0, atol=1e-12)
    assert solver.diffusion_factor(ky, kx) ** steps == pytest.approx(expected, rel=1e-13)


def test_burgers_diffusion_converges_to_continuous_decay():
    nu, t_end, k2 = 0.1, 1.0, 1**2 + 2**2
    errors = []
    for n in (8, 16, 32, 64):
        solver = BurgersSolver(resolution=n, size=2 * math.pi, nu=nu, dt=t_end / n, advection=False)
        yy, xx = solver.grid.cell_centers()
        u0 = np.stack([np.sin(xx + 2 * yy), np.cos(xx + 2 * yy)])
        u = u0
        for _ in range(n):
            u = solver.step(u)
        amplitude = float(np.sum(u * u0) / np.sum(u0 * u0))
        errors.append(abs(amplitude - math.exp(-nu * k2 * t_end)))
    ratios = [a / b for a, b in zip(errors, errors[1:], strict=False)]
    assert all(r > 1.8 for r in ratios), (errors, ratios)
    assert errors[-1] < 3e-3


def test_burgers_is_deterministic_from_seed():
    a, b = BurgersSolver(resolution=16), BurgersSolver(resolution=16)
    x_a, x_b = a.initial_state(7), b.initial_state(7)
    assert x_a.shape == (2, 16, 16) and x_a.dtype == np.float64
    np.testing.assert_array_equal(x_a, x_b)
    f_a, f_b = a.conditions(7)["forcing"], b.conditions(7)["forcing"]
    np.testing.assert_array_equal(f_a, f_b)
    np.testing.assert_array_equal(a.rollout(x_a, 5, forcing=f_a), b.rollout(x_b, 5, forcing=f_b))
    assert not np.allclose(a.initial_state(8), x_a)
    x_copy = x_a.copy()
    a.step(x_a, forcing=f_a)
    np.testing.assert_array_equal(x_a, x_copy)  # step does not modify its input


def test_burgers_rollout_stays_finite_and_bounded():
    solver = BurgersSolver(resolution=32)
    x = solver.initial_state(0)
    traj = solver.rollout(x, 50, **solver.conditions(0))
    assert traj.shape == (51, 2, 32, 32)
    assert np.isfinite(traj).all() and np.abs(traj).max() < 5.0


@pytest.mark.parametrize("resolution", [32, (24, 40)])
def test_burgers_torch_twin_matches_numpy(resolution):
    solver = BurgersSolver(resolution=resolution)
    twin = solver.torch_twin()
    seeds = [0, 1, 2]
    states = np.stack([solver.initial_state(s) for s in seeds])
    forcings = np.stack([solver.forcing(s) for s in seeds])
    x_np, x_t = states, torch.from_numpy(states)
    f_t = torch.from_numpy(forcings)
    for _ in range(5):
        x_np = np.stack([solver.step(x_np[b], forcing=forcings[b]) for b in range(len(seeds))])
        x_t = twin.step_torch(x_t, f_t)
        assert x_t.dtype == torch.float64
        assert float((x_t - torch.from_numpy(x_np)).abs().max()) < 1e-10


def test_burgers_viscosity_is_a_per_simulation_condition_in_both_backends():
    """nu per state: the numpy step (sparse LU per viscosity), the batched numpy step (FFT) and the twin
    agree, and a state stepped at nu = 0.3 is not the one stepped at the constructor's 0.1."""
    solver = BurgersSolver(resolution=16)
    seeds, nus = [0, 1, 2], np.array([0.03, 0.1, 0.3])
    states = np.stack([solver.initial_state(s) for s in seeds])
    conds = [solver.conditions(s, nu=n) for s, n in zip(seeds, nus)]
    forcing = np.stack([c["forcing"] for c in conds])
    loop = np.stack([solver.step(states[b], **conds[b]) for b in range(3)])
    np.testing.assert_allclose(solver.step_batch(states, forcing=forcing, nu=nus), loop, rtol=0, atol=1e-12)
    twin = solver.torch_twin()(torch.from_numpy(states), torch.from_numpy(forcing), torch.from_numpy(nus))
    np.testing.assert_allclose(twin.numpy(), loop, rtol=0, atol=1e-12)
    assert not np.allclose(loop[2], solver.step(states[2], forcing=forcing[2]))
    with pytest.raises(ValueError, match="condition nu=-0.1 must be > 0"):
        solver.conditions(0, nu=-0.1)


def test_burgers_torch_twin_is_differentiable():
    solver = BurgersSolver(resolution=16)
    twin = solver.torch_twin()
    x = torch.from_numpy(solver.initial_state(0))[None].requires_grad_(True)
    f = torch.from_numpy(solver.forcing(0)).requires_grad_(True)
    y = x
    for _ in range(3):
        y = twin(y, f)
    y.pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert f.grad is not None and f.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ wake
def test_wake_torch_twin_matches_the_numpy_solver_to_float64_rounding():
    """Rollouts of the twin equal the numpy solver's (batched and per-state steps) to rounding, at
    Reynolds numbers with one and several diffusion sub-steps, with a body force; the twin module never
    imports the numpy solver (it shares solvers/cylinder.py)."""
    import ast
    import inspect

    from deepzero_apps.solvers import wake_torch

    imported = {n.module for n in ast.walk(ast.parse(inspect.getsource(wake_torch))) if isinstance(n, ast.ImportFrom)}
    assert "wake" not in imported and "cylinder" in imported
    solver = WakeSolver((16, 32))
    twin = solver.torch_twin()
    states = np.stack([solver.initial_state(s) for s in range(3)])
    re = np.array([20.0, 300.0, 2500.0])  # 20: sub-stepped diffusion
    forcing = 1e-3 * np.random.default_rng(0).normal(size=states.shape)
    a, b = states, torch.from_numpy(states)
    for _ in range(12):
        a = solver.step_batch(a, re=re, forcing=forcing)
        b = twin(b, torch.from_numpy(re), torch.from_numpy(forcing))
        assert b.dtype == torch.float64
    assert np.abs(a - states).max() > 1e-2  # it moved
    np.testing.assert_allclose(b.numpy(), a, rtol=0, atol=1e-12)
    one = states[1]
    for _ in range(3):
        one = solver.step(one, re=re[1], forcing=forcing[1])
    np.testing.assert_allclose(twin(twin(twin(torch.from_numpy(states[1:2]), torch.tensor([re[1]]), torch.from_numpy(forcing[1:2])),
                                         torch.tensor([re[1]]), torch.from_numpy(forcing[1:2])),
                                    torch.tensor([re[1]]), torch.from_numpy(forcing[1:2]))[0].numpy(), one, rtol=0, atol=1e-12)


def test_wake_torch_twin_gradient_matches_finite_differences_of_the_numpy_rollout():
    """The twin's autograd directional derivative of a 3-step rollout loss equals central differences
    of the numpy solver's (float64)."""
    solver = WakeSolver((8, 16))
    twin = solver.torch_twin()
    states = np.stack([solver.initial_state(s) for s in range(2)])
    re = np.array([150.0, 700.0])
    target = np.random.default_rng(1).normal(size=states.shape)
    direction = np.random.default_rng(2).normal(size=states.shape)

    def loss_np(x):
        for _ in range(3):
            x = solver.step_batch(x, re=re)
        return float(((x - target) ** 2).sum())

    x = torch.from_numpy(states).requires_grad_(True)
    y = x
    for _ in range(3):
        y = twin(y, torch.from_numpy(re))
    ((y - torch.from_numpy(target)) ** 2).sum().backward()
    exact = float((x.grad * torch.from_numpy(direction)).sum())
    eps = 1e-6
    fd = (loss_np(states + eps * direction) - loss_np(states - eps * direction)) / (2 * eps)
    assert fd == pytest.approx(exact, rel=1e-5)


def test_wake_projection_is_divergence_free(wake):
    rng = np.random.default_rng(0)
    state = rng.normal(size=wake.state_shape) + np.array([1.0, 0.0])[:, None, None]
    assert np.abs(wake.divergence(state)).max() > 0.1
    projected = wake.project(state)
    assert np.abs(wake.divergence(projected)).max() < 1e-10
    # Projection is idempotent.
    np.testing.assert_allclose(wake.project(projected), projected, atol=1e-10)


def test_wake_rollout_stable_divergence_free_and_zero_in_obstacle(wake):
    x = wake.initial_state(3)
    cond = wake.conditions(3, re=500.0)
    assert np.abs(wake.divergence(x)).max() < 1e-10
    for i in range(60):
        x = wake.check(wake.step(x, **cond), step=i + 1)
        assert np.abs(wake.divergence(x)).max() < 1e-9
    assert np.abs(x).max() < 5.0
    # Every face touching the cylinder (and the top wall) is exactly zero.
    assert wake.solid.sum() > 0
    assert np.all(x[wake.fixed] == 0.0)
    (yu, xu), (yv, xv) = wake._u_pos, wake._v_pos
    (cx, cy), r = wake.center, wake.radius
    assert np.all(x[0][(xu - cx) ** 2 + (yu - cy) ** 2 < r**2] == 0.0)
    assert np.all(x[1][(xv - cx) ** 2 + (yv - cy) ** 2 < r**2] == 0.0)
    # The flow goes through the domain: mean outflow equals the inflow.
    assert x[0][:, -1].mean() == pytest.approx(wake.inflow, rel=1e-9)


def test_wake_reference_step_and_resolution_transfer():
    fine, coarse = WakeSolver("reference"), WakeSolver("source")
    assert fine.grid.shape == (128, 256) and coarse.grid.shape == (32, 64)
    assert fine.grid.size == coarse.grid.size == (100.0, 200.0)
    x = fine.step(fine.initial_state(0), re=150.0)
    assert np.abs(fine.divergence(x)).max() < 1e-9
    down = fine.downsample(x, coarse)
    assert down.shape == coarse.state_shape
    assert np.abs(coarse.divergence(down)).max() < 1e-9  # flux-conserving restriction
    up = coarse.upsample(coarse.initial_state(1), fine)
    assert up.shape == fine.state_shape
    assert np.abs(fine.divergence(up)).max() < 1e-9


def test_wake_reynolds_changes_dynamics(wake):
    x = wake.initial_state(0)
    a, b = x, x
    for _ in range(5):
        a, b = wake.step(a, re=100.0), wake.step(b, re=1000.0)
    assert not np.allclose(a, b)
    with pytest.raises(SolverError, match="Reynolds"):
        wake.step(x, re=-1.0)


# -------------------------------------------------------------------------------- base helpers
def test_downsample_preserves_shape_and_mean():
    fine, coarse = BurgersSolver("reference", diffusion=False), BurgersSolver("source", diffusion=False)
    x = fine.initial_state(0) + 0.3
    down = fine.downsample(x, coarse)
    assert down.shape == (2, 32, 32)
    np.testing.assert_allclose(down.mean(axis=(1, 2)), x.mean(axis=(1, 2)), atol=1e-13)
    batch = np.stack([x, 2 * x])
    np.testing.assert_allclose(fine.downsample(batch, coarse)[1], 2 * down, atol=1e-13)
    up = coarse.upsample(down, fine)
    assert up.shape == x.shape
    np.testing.assert_allclose(up.mean(axis=(1, 2)), x.mean(axis=(1, 2)), atol=1e-13)
    np.testing.assert_allclose(fine.downsample(up, coarse), down, atol=1e-14)
    with pytest.raises(ValueError, match="integer refinement"):
        fine.downsample(x, (30, 30))


def test_check_state_messages():
    ok = check_state("burgers", np.zeros((2, 4, 4)), (2, 4, 4), step=3)
    assert ok.dtype == np.float64
    bad = np.zeros((2, 4, 4))
    bad[1, 2, 3] = np.nan
    with pytest.raises(SolverError) as e:
        check_state("burgers", bad, (2, 4, 4), step=3)
    msg = str(e.value)
    assert "\n" not in msg and "'burgers'" in msg and "step 3" in msg and "NaN" in msg and "(1, 2, 3)" in msg
    with pytest.raises(SolverError, match=r"step 5: state has shape \(2, 4, 3\), expected \(2, 4, 4\)"):
        check_state("wake", np.zeros((2, 4, 3)), (2, 4, 4), step=5)
    with pytest.raises(SolverError, match="inf"):
        check_state("wake", np.full((1, 2, 2), np.inf), None)


def test_grid_and_resolution_presets():
    g = Grid(shape=(32, 64), size=(100.0, 200.0), boundary="wake")
    assert g.spacing == (3.125, 3.125) and (g.ny, g.nx) == (32, 64)
    with pytest.raises(ValueError):
        Grid(shape=(0, 4))
    assert BurgersSolver("reference", diffusion=False).grid.shape == (128, 128)
    assert WakeSolver(128).grid.shape == (64, 128)
    with pytest.raises(ValueError, match="unknown resolution"):
        BurgersSolver("medium")


def test_registry_builtins_and_pyproject_entry_points():
    names = list_solvers()
    assert {"burgers", "wake", "external"} <= set(names)
    solver = create_solver("burgers", resolution=8)
    assert isinstance(solver, Solver) and solver.state_shape == (2, 8, 8)
    with pytest.raises(ValueError, match=r"unknown solver 'nope'.*burgers"):
        create_solver("nope")
    # pyproject.toml declares the same built-ins as entry points, each pointing to a Solver subclass.
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    table = tomllib.loads(pyproject.read_text())["project"]["entry-points"]["deepzero_apps.solvers"]
    assert table == BUILTINS
    from deepzero_apps.solvers.registry import _import_object

    for target in table.values():
        assert issubclass(_import_object(target), Solver)


def test_the_two_cylinder_flows_share_parameters_checks_and_reynolds_numbers():
    """wake and phiflow_wake are one setup in two codes: same config params (from the constructors'
    signatures, which the registry reads), same checks, same per-seed Reynolds number."""
    pytest.importorskip("phi")
    from deepzero_apps.solvers.phiflow_wake import PhiflowWakeSolver
    from deepzero_apps.solvers.registry import solver_config

    shared = {"size", "dt", "inflow", "center", "radius", "perturbation"}  # and the condition re
    assert set(solver_config("wake")["params"]) == shared
    assert set(solver_config("phiflow_wake")["params"]) == shared | {"tolerance"}
    assert solver_config("wake")["conditions"] == solver_config("phiflow_wake")["conditions"]
    scipy_flow, phi_flow = WakeSolver(32, re=50), PhiflowWakeSolver(32, re=50)
    assert scipy_flow.conditions(0) == phi_flow.conditions(0) == {"re": 50.0}
    assert phi_flow.conditions(0, re=123) == scipy_flow.conditions(0, re=123) == {"re": 123.0}
    shared |= {"re"}
    assert {k: v for k, v in scipy_flow.describe().items() if k in shared} == \
        {k: v for k, v in phi_flow.describe().items() if k in shared}
    for solver in (WakeSolver, PhiflowWakeSolver):
        with pytest.raises(ValueError, match="dt=30 is beyond the stability limit"):
            solver(32, dt=30)
        with pytest.raises(ValueError, match="re=-5 must be > 0"):
            solver(32, re=-5)
        with pytest.raises(ValueError, match="condition re=0.0 must be > 0"):
            solver(32).conditions(0, re=0)
    with pytest.raises(ValueError, match="tolerance=0.1"):
        PhiflowWakeSolver(32, tolerance=0.1)


# ------------------------------------------------------------------------------------ PhiFlow wake
def test_phiflow_wake_backends_agree_and_the_twin_differentiates():
    pytest.importorskip("phi")
    torch = pytest.importorskip("torch")
    from deepzero_apps.solvers.phiflow_wake import PhiflowWakeSolver

    solver = PhiflowWakeSolver((8, 16))
    states = np.stack([solver.initial_state(s) for s in (0, 1)])
    re = np.array([150.0, 700.0])
    x = torch.tensor(states, requires_grad=True)
    a, b = states, x
    twin = solver.torch_twin()
    for _ in range(3):
        a, b = solver.step_batch(a, re=re), twin(b, torch.tensor(re))
    np.testing.assert_allclose(b.detach().numpy(), a, rtol=0, atol=1e-6)
    assert not np.allclose(a, states)  # it moved
    # the batch dimension is the per-sample step
    np.testing.assert_allclose(solver.step_batch(states, re=re)[1], solver.step(states[1], re=re[1]), atol=1e-12)
    (b * torch.from_numpy(np.random.default_rng(0).normal(size=b.shape))).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_phiflow_wake_without_phiflow_says_what_to_install(monkeypatch):
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "phi", None)  # as if the extra were not installed
    monkeypatch.delitem(sys.modules, "deepzero_apps.solvers.phiflow_wake", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'deepzero-apps\[phiflow\]'"):
        importlib.import_module("deepzero_apps.solvers.phiflow_wake")
    with pytest.raises(ImportError, match=r"deepzero-apps\[phiflow\]"):
        create_solver("phiflow_wake")
