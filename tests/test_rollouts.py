"""Batched ZO-SOL rollouts: vectorized solver steps and stacked-parameter queries equal the loops."""

from __future__ import annotations

import os
import socket
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.func import functional_call

from deepzero_apps.engine import (
    CGE,
    RGE,
    BatchedEvaluator,
    ReferenceEvaluator,
    ShardedEvaluator,
    StackedEvaluator,
    call_stacked,
    init_distributed,
    stacked,
)
from deepzero_apps.models import create_model
from deepzero_apps.solvers import Solver
from deepzero_apps.solvers.burgers import BurgersSolver
from deepzero_apps.solvers.external import ExternalSolver
from deepzero_apps.solvers.wake import WakeSolver
from deepzero_apps.tasks.pde.app import RolloutObjective, black_box_step
from deepzero_apps.tasks.pde.data import Stepper


def loop_step(solver: Solver, states: np.ndarray, **conditions) -> np.ndarray:
    """The base class's per-state loop: the reference for every native step_batch."""
    return Solver.step_batch(solver, states, **conditions)


@pytest.mark.parametrize(
    "solver", [BurgersSolver(resolution=(8, 12)), WakeSolver(resolution=(16, 32))], ids=["burgers", "wake"]
)
@pytest.mark.parametrize("noise", [0.05, 30.0], ids=["near", "beyond_the_domain"])
def test_native_step_batch_equals_the_per_state_step(solver, noise):
    """`noise` makes every state different; at 30 the backtraces leave the domain (Burgers wraps
    several periods, wake clamps at its edges)."""
    seeds = [0, 1, 2, 0, 5]
    states = np.stack([solver.initial_state(s) for s in seeds])
    states += noise * np.random.default_rng(0).normal(size=states.shape)
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
    solver = WakeSolver(resolution=(16, 32), dt=24.0)
    re = [240.0, 36.0, 15.0]  # rates of dt=40 with Re 400, 60, 25 (Courant number within 4)
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


@pytest.mark.parametrize("padding_mode", ["circular", "zeros", "reflect"])
def test_call_stacked_grouped_convs_equal_one_call_per_parameter_set(padding_mode, monkeypatch):
    """A fully convolutional net runs as grouped convs on the (B, K x C, H, W) layout, never vmapped."""
    model = create_model(
        "correction_net", in_channels=2, out_channels=2, width=3, blocks=1, kernel_size=3, padding_mode=padding_mode
    ).double()
    if padding_mode == "reflect":  # a plain nn.Conv2d (its own padding) beside the WrapConv2d ones
        model[-1] = torch.nn.Conv2d(3, 2, 3, padding=1, padding_mode="reflect").double()
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() + 0.1 * torch.randn(4, *p.shape, dtype=p.dtype) for n, p in model.named_parameters()}
    x = torch.randn(4, 2, 2, 6, 5, dtype=torch.float64)
    want = torch.stack([functional_call(model, {n: params[n][k] for n in names}, (x[k],)) for k in range(4)])
    torch.testing.assert_close(call_stacked(model, params, x), want, rtol=1e-12, atol=1e-14)  # checked once
    monkeypatch.setattr(torch.func, "vmap", None)  # then the grouped path runs alone
    torch.testing.assert_close(call_stacked(model, params, x), want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("pad", [True, False], ids=["outputs_padded", "plain"])
def test_grouped_convs_with_padded_outputs_equal_one_call_per_parameter_set(pad, monkeypatch):
    """Layers with fewer than 4 outputs per group run zero-padded to 4 on the CPU, on every call (the
    same kernels in every process); padded and plain forms both equal one call per parameter set."""
    if not pad:
        monkeypatch.setattr(stacked, "PADDED_WIDTH", 1)
    pads = []
    monkeypatch.setattr(F, "pad", lambda *a, _pad=F.pad, **kw: pads.append(a[1]) or _pad(*a, **kw))
    model = create_model(
        "correction_net", in_channels=2, out_channels=1, width=4, blocks=0, kernel_size=3, padding_mode="zeros"
    ).double()  # 2 -> 4 (4 outputs: never padded), 4 -> 1 (padded unless PADDED_WIDTH is 1)
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() + 0.1 * torch.randn(5, *p.shape, dtype=p.dtype) for n, p in model.named_parameters()}
    x = torch.randn(5, 3, 2, 6, 5, dtype=torch.float64)
    want = torch.stack([functional_call(model, {n: params[n][k] for n in names}, (x[k],)) for k in range(5)])
    monkeypatch.setattr(stacked, "_GROUPED_OK", stacked.weakref.WeakKeyDictionary({model: True}))
    for _ in range(2):
        torch.testing.assert_close(call_stacked(model, params, x), want, rtol=1e-12, atol=1e-14)
    padded = [p for p in pads if p in ((0, 0, 0, 0, 0, 0, 0, 3), (0, 3))]  # weight, bias of the 4 -> 1 layer
    assert len(padded) == (4 if pad else 0)


@pytest.mark.parametrize(
    "layers",
    [
        lambda: [torch.nn.Conv2d(2, 3, 3), torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 3, 2)],  # not all convs
        lambda: [torch.nn.Conv2d(2, 4, 3), torch.nn.ChannelShuffle(2), torch.nn.Conv2d(4, 2, 1)],  # reads channels
    ],
    ids=["linear", "channel_shuffle"],
)
def test_call_stacked_vmaps_networks_the_grouped_layout_does_not_fit(layers):
    model = torch.nn.Sequential(*layers()).double()
    params = {n: p.detach() + 0.1 * torch.randn(3, *p.shape, dtype=p.dtype) for n, p in model.named_parameters()}
    x = torch.randn(3, 2, 2, 6, 5, dtype=torch.float64)
    want = torch.stack([functional_call(model, {n: v[k] for n, v in params.items()}, (x[k],)) for k in range(3)])
    for _ in range(2):  # the check's call and a later one
        torch.testing.assert_close(call_stacked(model, params, x), want, rtol=1e-12, atol=1e-14)


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


def train_rollout(sharded: bool) -> dict[str, torch.Tensor]:
    """Two CGE steps of a small Burgers ZO-SOL problem; the state dict plus the rows this process
    evaluated itself under "ran"."""
    obj = rollout_objective(BurgersSolver(resolution=(8, 8)))
    ran = []
    inner = obj._losses
    obj._losses = lambda thetas, *a: ran.append(len(thetas)) or inner(thetas, *a)
    evaluator = StackedEvaluator(chunk=16)
    est = CGE(mu=1e-3, evaluator=ShardedEvaluator(evaluator) if sharded else evaluator)
    opt = torch.optim.SGD(obj.module.parameters(), lr=0.5)
    for step in range(2):
        opt.zero_grad()
        est.estimate(obj, BATCH, step=step)
        opt.step()
    return {
        **obj.module.state_dict(),
        "queries": torch.tensor(obj.counter.queries),
        "ran": torch.tensor(sum(ran)),
    }


def _rollout_worker(r: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    init_distributed("cpu")
    try:
        torch.save(train_rollout(sharded=True), os.path.join(out, f"rank{r}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_split_the_perturbations_and_equal_one_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rollout_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = train_rollout(sharded=False)
    ran = [int(r.pop("ran")) for r in (*ranks, single)]
    assert ran[0] + ran[1] == ran[2] and abs(ran[0] - ran[1]) <= 2, ran  # equal shares of the queries
    for key, value in single.items():
        torch.testing.assert_close(ranks[0][key], value, rtol=1e-12, atol=1e-15)
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # every rank takes the same step
    assert not torch.equal(
        single["2.weight"],
        rollout_objective(BurgersSolver(resolution=(8, 8))).module.state_dict()["2.weight"],
    )


BATCH_SCRIPT = """
import sys
import numpy as np
inp, out, forcing, re, log = sys.argv[1:6]
x = np.load(inp)
r = np.load(re) if re.endswith(".npy") else float(re)
r = r.reshape(-1, 1, 1, 1) if x.ndim == 4 else r
np.save(out, 0.5 * x * r + np.load(forcing))
open(log, "a").write(f"{x.shape[0] if x.ndim == 4 else 1}\\n")
"""


def test_external_solver_declaring_batches_is_one_process_call_per_batch(tmp_path):
    script, log = tmp_path / "stepper.py", tmp_path / "calls.log"
    script.write_text(BATCH_SCRIPT)
    args = [sys.executable, str(script), "{input}", "{output}", "{forcing}", "{re}", str(log)]

    def solver(batch: bool) -> ExternalSolver:
        return ExternalSolver(
            args, grid=(4, 6), channels=("u", "v"), workdir=tmp_path, batch=batch, timeout=60
        )

    rng = np.random.default_rng(0)
    states, forcing = rng.normal(size=(3, 2, 4, 6)), list(rng.normal(size=(3, 2, 4, 6)))
    re = [1.0, 2.0, 3.0]
    want = solver(False).step_batch(states, forcing=forcing, re=re)
    assert log.read_text().split() == ["1", "1", "1"] and not solver(False).batch_native
    log.unlink()
    batched = solver(True)
    got = batched.step_batch(states, forcing=forcing, re=re)
    assert log.read_text().split() == ["3"] and batched.batch_native
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got[2], 1.5 * states[2] + forcing[2])
