"""Batched ZO-SOL rollouts: vectorized solver steps and stacked-parameter queries equal the loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepzero_apps.engine import CGE, RGE, BatchedEvaluator, ReferenceEvaluator, StackedEvaluator
from deepzero_apps.models import create_model
from deepzero_apps.solvers import Solver
from deepzero_apps.solvers.burgers import BurgersSolver
from deepzero_apps.solvers.wake import WakeSolver
from deepzero_apps.tasks.pde import RolloutObjective, black_box_step
from deepzero_apps.tasks.pde_data import Stepper

pytestmark = pytest.mark.usefixtures("one_thread")


def loop_step(solver: Solver, states: np.ndarray, **conditions) -> np.ndarray:
    """The base class's per-state loop: the reference for every native step_batch."""
    return Solver.step_batch(solver, states, **conditions)


@pytest.mark.parametrize(
    "solver", [BurgersSolver(resolution=(8, 12)), WakeSolver(resolution=(16, 32))], ids=["burgers", "wake"]
)
def test_native_step_batch_equals_the_per_state_step(solver):
    seeds = [0, 1, 2, 0, 5]
    states = np.stack([solver.initial_state(s) for s in seeds])
    states += 0.05 * np.random.default_rng(0).normal(size=states.shape)  # every state different
    conditions = Stepper(solver, seeds).batched_conditions(range(len(seeds)))
    assert solver.batch_native and conditions
    want = loop_step(solver, states, **conditions)
    got = solver.step_batch(states, **conditions)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13 * np.abs(want).max())
    assert not np.allclose(got, states)


def test_a_subclass_overriding_step_alone_gets_the_loop():
    class Doubled(BurgersSolver):
        def step(self, state, forcing=None, **params):
            return 2 * super().step(state, forcing=forcing, **params)

    solver = Doubled(resolution=(8, 8))
    states = np.stack([solver.initial_state(s) for s in range(3)])
    assert not solver.batch_native and BurgersSolver(resolution=(8, 8)).batch_native
    np.testing.assert_array_equal(solver.step_batch(states), np.stack([solver.step(x) for x in states]))


def test_wake_batch_keeps_each_states_diffusion_substeps():
    """Viscosities that need 1, 2 and 4 explicit sub-steps in one batch (nu per state)."""
    solver = WakeSolver(resolution=(16, 32), dt=40.0)
    re = [400.0, 60.0, 25.0]
    states = np.stack([solver.initial_state(s) for s in range(3)])
    want = loop_step(solver, states, re=re)
    np.testing.assert_allclose(solver.step_batch(states, re=re), want, rtol=0, atol=1e-12)


def rollout_objective(solver: Solver, unroll: int = 3, sims: int = 3) -> RolloutObjective:
    torch.manual_seed(0)
    model = create_model(
        "correction_net",
        in_channels=2,
        out_channels=2,
        width=3,
        blocks=1,
        kernel_size=3,
        padding_mode="circular",
    ).double()
    seeds = list(range(sims))
    refs = torch.from_numpy(
        np.stack([solver.rollout(solver.initial_state(s), 6, **solver.conditions(s)) for s in seeds])
    )
    refs = refs + 0.01 * torch.randn(refs.shape, dtype=torch.float64)  # the reference is not the source
    return RolloutObjective(model, black_box_step(Stepper(solver, seeds)), refs, unroll)


BATCH = (torch.tensor([2, 0]), torch.tensor([1, 3]))


@pytest.mark.parametrize(
    "solver", [BurgersSolver(resolution=(8, 8)), WakeSolver(resolution=(8, 16))], ids=["burgers", "wake"]
)
@pytest.mark.parametrize(
    "evaluator", [StackedEvaluator(chunk=7), BatchedEvaluator()], ids=["stacked", "batched"]
)
def test_stacked_rollout_queries_equal_the_loop(solver, evaluator):
    obj = rollout_objective(solver)
    coords = torch.randperm(obj.coords.dim)[:40]
    ref = ReferenceEvaluator()
    with torch.no_grad():
        f0, ctx = evaluator.base(obj, BATCH)
        want = ref.coordinate_losses(obj, BATCH, None, coords, 1e-3)
        before = obj.counter.queries
        got = evaluator.coordinate_losses(obj, BATCH, ctx, coords, 1e-3)
        assert obj.counter.queries - before == len(coords)
        assert float(f0) == pytest.approx(float(obj.loss(BATCH)), rel=1e-14)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert (got - float(f0)).abs().min() > 0  # every perturbation moved the loss


def test_cge_gradient_through_the_stacked_path_matches_autograd():
    """A float64 rollout through the torch twin: forward CGE with a small mu vs backprop."""
    solver = BurgersSolver(resolution=(8, 8))
    obj = rollout_objective(solver)
    twin = solver.torch_twin()
    forcing = torch.stack([torch.from_numpy(solver.forcing(s)) for s in range(3)])
    obj.step = lambda state, sims, k: twin(state, forcing=forcing[sims])
    params = [p for p in obj.module.parameters()]
    loss = obj.loss(BATCH)
    want = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
    CGE(mu=1e-6, evaluator="stacked").estimate(obj, BATCH)
    got = torch.cat([p.grad.flatten() for p in params])
    assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.999


def test_rge_queries_restart_from_the_shared_first_step():
    """RGE's one-at-a-time queries reuse the base query's first solver step: same gradient, fewer steps."""
    solver = BurgersSolver(resolution=(8, 8))
    grads, steps = [], []
    for evaluator in ("reference", "reuse"):
        obj = rollout_objective(solver)
        calls = []
        inner = obj.step
        obj.step = lambda state, sims, k, inner=inner, calls=calls: calls.append(k) or inner(state, sims, k)
        RGE(q=4, mu=1e-3, evaluator=evaluator).estimate(obj, BATCH)
        grads.append(torch.cat([p.grad.flatten() for p in obj.module.parameters()]))
        steps.append(calls.count(1))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=0)
    assert steps == [5, 1]
