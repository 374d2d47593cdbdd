"""ZO-SOL query throughput: the one-at-a-time loop, batched rollouts in one process, and on 2 ranks.

One JSON line per problem (default Burgers: 16x16 source grid; default wake: 16x32 source grid; both
the `experiment=pde_*` protocols: width-4 correction net, 8-step rollouts, 2 windows per step, sparse
CGE over a random 10% of each conv weight plus all biases, mu = 1e-4) with ZO-SOL queries per second
  loop:      every query reruns its whole rollout, one network call and one solver call per state
             per step (`ReferenceEvaluator`, the solver's per-state `step` loop): the path before
             batched rollouts;
  batched:   `StackedEvaluator`: the first solver step once per ZO step, K perturbed parameter
             vectors per stacked network call (grouped convolutions), one vectorized solver call
             on all K x B states;
  ranks:     the batched path under `ShardedEvaluator` on --ranks gloo processes (1 thread each);
and the wall time of one full ZO-SOL step (base query + all coordinate queries + gradient) for the
loop and the batched path, plus where that time goes: the solver, the correction network, the rest.
What bounds the batched path: `bound_speedup_if_only_solver_and_network` (the speedup over the loop
if the rest cost nothing) and the network's convolution rate (torch's FlopCounterMode FLOPs over its
seconds) beside the rate this machine gives a wide convolution (64 -> 64 channels, a ResNet-20
layer). For the ranks, `why` says where a shortfall goes: one rank's share timed alone (the ideal split), the shares timed in
independent processes at the same time (what the machine's cores give parallel work, no communication),
and the remainder (broadcast and all-reduce).
Then one line `classify_allocator` with the default `deepzero-task classify` wall time with and without
the allocator setting (DEEPZERO_MALLOC_TUNING=0), runs alternated. ResNet-20 engine vs reuse with the
CLI's settings: `benchmarks/cge_throughput.py --models resnet20 --ranks 1`.

Reference trajectories are coarse-solver rollouts with noise (the fine simulations only change the
loss values, not the work per query). Every figure in a line is measured in the same run; the loop and
batched calls are timed in turn (`--reps` each, best of), so a load change on a shared machine hits both.

    python benchmarks/zo_sol_throughput.py                       # burgers, wake, classify
    python benchmarks/zo_sol_throughput.py --problems burgers --classify-runs 0
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from unittest import mock

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from deepzero_apps.allocator import tune_malloc
from deepzero_apps.engine import (
    CGE,
    ReferenceEvaluator,
    ShardedEvaluator,
    SparseCoordinateSampler,
    StackedEvaluator,
    compute_ratios,
    init_distributed,
)
from deepzero_apps.models import create_model
from deepzero_apps.solvers import Solver
from deepzero_apps.solvers.burgers import BurgersSolver
from deepzero_apps.solvers.wake import WakeSolver
from deepzero_apps.tasks.pde import app
from deepzero_apps.tasks.pde.app import RolloutObjective, black_box_step
from deepzero_apps.tasks.pde.conditions import make_split
from deepzero_apps.tasks.pde.data import Stepper

MU, UNROLL, SIMS, STEPS = 1e-4, 8, 8, 64


class LoopStepper(Stepper):
    """The stepper as before vectorized solvers: the base class's loop over per-state steps."""

    def __call__(self, states: np.ndarray, sims, step: int) -> np.ndarray:
        return Solver.step_batch(self.solver, states, **self.batched_conditions(sims))


def problem(
    name: str, loop: bool
) -> tuple[RolloutObjective, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Objective, one batch of 2 windows and the step's sparse coordinates (identical in every process)."""
    if name == "burgers":
        solver, warmup = BurgersSolver(resolution=(16, 16), size=32.0, nu=0.1, dt=0.1), 0
    else:
        solver, warmup = WakeSolver(resolution=(16, 32), dt=1.0), 200
    seeds = list(range(SIMS))
    values = make_split("train", seeds, dict(solver.condition_defaults)).values  # per-seed nu / Re, as the app
    refs = []
    for s, v in zip(seeds, values):
        conditions = solver.conditions(s, **v)
        state = solver.initial_state(s)
        for _ in range(warmup):
            state = solver.step(state, **conditions)
        refs.append(solver.rollout(state, STEPS, **conditions))
    refs = torch.from_numpy(np.stack(refs))
    refs = refs + 0.01 * refs.std() * torch.randn(
        refs.shape, generator=torch.Generator().manual_seed(0), dtype=refs.dtype
    )
    torch.manual_seed(0)
    padding = "circular" if name == "burgers" else "zeros"
    model = create_model(
        "correction_net",
        in_channels=2,
        out_channels=2,
        width=4,
        blocks=1,
        kernel_size=5,
        padding_mode=padding,
    )
    stepper = (LoopStepper if loop else Stepper)(solver, seeds, values)
    obj = RolloutObjective(model, black_box_step(stepper), refs, UNROLL)
    ratios = compute_ratios("random", model, sparsity=0.9, ordering="magnitude", seed=0)
    coords = SparseCoordinateSampler(obj.coords, ratios, mask_interval=1, seed=0, dense_unscored=True).coords(
        0
    )
    return obj, (torch.tensor([3, 6]), torch.tensor([10, 40])), coords


def time_queries(ev, obj, batch, coords, reps: int = 1, start: Callable[[], object] = lambda: None) -> float:
    """Best seconds of one coordinate_losses call over `reps` (after one untimed call); `start()` runs
    before each timed call (a barrier, so concurrent processes time the same moments)."""
    with torch.no_grad():
        _, ctx = ev.base(obj, batch)
        ev.coordinate_losses(obj, batch, ctx, coords, MU)
        best = float("inf")
        for _ in range(reps):
            start()
            t0 = time.perf_counter()
            ev.coordinate_losses(obj, batch, ctx, coords, MU)
            best = min(best, time.perf_counter() - t0)
    return best


def interleaved(cases: list, batch, coords, reps: int) -> tuple[list[float], list[float]]:
    """Best wall and best CPU seconds of one coordinate_losses call of each (evaluator, objective)
    case, the cases timed in turn `reps` times (after one untimed call each): on a shared machine a
    load change then hits every case alike instead of whichever ran during it, and the CPU time
    (this process's) leaves out the moments other jobs held the core."""
    wall, cpu = [float("inf")] * len(cases), [float("inf")] * len(cases)
    with torch.no_grad():
        ctxs = [ev.base(obj, batch)[1] for ev, obj in cases]
        for (ev, obj), ctx in zip(cases, ctxs):
            ev.coordinate_losses(obj, batch, ctx, coords, MU)
        for _ in range(reps):
            for i, ((ev, obj), ctx) in enumerate(zip(cases, ctxs)):
                t0, c0 = time.perf_counter(), time.process_time()
                ev.coordinate_losses(obj, batch, ctx, coords, MU)
                wall[i] = min(wall[i], time.perf_counter() - t0)
                cpu[i] = min(cpu[i], time.process_time() - c0)
    return wall, cpu


def step_seconds(ev, obj, batch, coords) -> float:
    """Wall time of one full ZO-SOL step: CGE.estimate (base query, coordinate queries, gradient)."""
    est = CGE(mu=MU, evaluator=ev)
    t0 = time.perf_counter()
    est.estimate(obj, batch, coords=coords)
    return time.perf_counter() - t0


def timed(fn: Callable, spent: list[float]) -> Callable:
    """`fn`, adding the seconds of every call to spent[0]."""

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - t0

    return wrapper


def step_parts(obj: RolloutObjective, run: Callable[[], object]) -> tuple[float, float, float]:
    """Seconds of `run()`, and of them the seconds inside the black-box solver and inside the
    correction network (the app's `correct` and `call_stacked`, timed where the objective calls them)."""
    wall, solver, network = [0.0], [0.0], [0.0]
    inner = obj.step
    obj.step = timed(inner, solver)
    with (
        mock.patch.object(app, "correct", timed(app.correct, network)),
        mock.patch.object(app, "call_stacked", timed(app.call_stacked, network)),
    ):
        try:
            timed(run, wall)()
        finally:
            obj.step = inner
    return wall[0], solver[0], network[0]


def network_gflop(obj: RolloutObjective, run: Callable[[], object]) -> float:
    """Convolution GFLOPs of `run()` as torch runs them (FlopCounterMode; the solver is numpy)."""
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops() / 1e9


def wide_conv_gflop_per_s(reps: int = 20) -> float:
    """The rate this machine gives a wide convolution (a ResNet-20 layer: 64 -> 64 channels, 3x3,
    8x8, batch 64, channels last), for comparison with the correction net's 4-channel groups."""
    x = torch.randn(64, 64, 8, 8).contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 3, 3)
    F.conv2d(x, w, padding=1)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        F.conv2d(x, w, padding=1)
        best = min(best, time.perf_counter() - t0)
    return 64 * 64 * 64 * 64 * 9 * 2 / best / 1e9


def _rank_worker(r: int, world: int, port: int, name: str, reps: int, queue) -> None:
    os.environ.update(
        RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    tune_malloc()
    init_distributed("cpu")
    try:
        obj, batch, coords = problem(name, loop=False)
        seconds = time_queries(ShardedEvaluator(StackedEvaluator()), obj, batch, coords, reps)
        if r == 0:
            queue.put(seconds)
    finally:
        dist.destroy_process_group()


def _shard_worker(r: int, world: int, name: str, reps: int, barrier, queue) -> None:
    """One of `world` independent processes (no communication) timing the batched path on its equal
    share of the coordinates, all starting together: what the machine gives parallel work."""
    torch.set_num_threads(1)
    tune_malloc()
    obj, batch, coords = problem(name, loop=False)
    mine = torch.sort(coords).values.tensor_split(world)[r]
    queue.put(time_queries(StackedEvaluator(), obj, batch, mine, reps, start=barrier.wait))


def concurrent_shard_seconds(name: str, world: int, reps: int) -> float:
    """Slowest of `world` simultaneous, independent shard timings (see `_shard_worker`)."""
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(world), ctx.SimpleQueue()
    procs = [ctx.Process(target=_shard_worker, args=(r, world, name, reps, barrier, queue)) for r in range(world)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    return max(queue.get() for _ in procs)


def ranks_seconds(name: str, world: int, reps: int) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_rank_worker, args=(world, port, name, reps, queue), nprocs=world, join=True)
    return queue.get()


def bench(name: str, world: int, reps: int) -> dict:
    torch.set_num_threads(1)
    loop_obj, batch, coords = problem(name, loop=True)
    obj, _, _ = problem(name, loop=False)
    n = len(coords)
    (t_loop, t_batched), (cpu_loop, cpu_batched) = interleaved(
        [(ReferenceEvaluator(), loop_obj), (StackedEvaluator(), obj)], batch, coords, reps
    )
    t_ranks = ranks_seconds(name, world, reps) if world > 1 else None
    if world > 1:  # where a 2-rank shortfall goes: the work split, the machine, or the communication
        t_share = time_queries(StackedEvaluator(), obj, batch, torch.sort(coords).values.tensor_split(world)[0], reps)
        t_concurrent = concurrent_shard_seconds(name, world, reps)
    parts = {  # one full ZO-SOL step each: (wall, in the solver, in the network) seconds
        "loop": step_parts(loop_obj, lambda: step_seconds(ReferenceEvaluator(), loop_obj, batch, coords)),
        "batched": step_parts(obj, lambda: step_seconds(StackedEvaluator(), obj, batch, coords)),
    }
    wall_b, solver_b, net_b = parts["batched"]
    gflop = network_gflop(obj, lambda: step_seconds(StackedEvaluator(), obj, batch, coords))
    speedup = t_loop / t_batched
    out = {
        "problem": name,
        "source_grid": list(obj.refs.shape[-2:]),
        "unroll": UNROLL,
        "windows_per_step": len(batch[0]),
        "parameters": obj.coords.dim,
        "queries_per_step": n,
        "queries_per_s": {"loop": round(n / t_loop, 1), "batched": round(n / t_batched, 1)},
        "speedup_batched_vs_loop": round(speedup, 2),
        "queries_per_cpu_s": {"loop": round(n / cpu_loop, 1), "batched": round(n / cpu_batched, 1)},
        "speedup_batched_vs_loop_cpu": round(cpu_loop / cpu_batched, 2),
        "zo_sol_step_seconds": {k: round(v[0], 3) for k, v in parts.items()},
        "solver_fraction_of_step": {k: round(v[1] / v[0], 2) for k, v in parts.items()},
        "network_fraction_of_step": {k: round(v[2] / v[0], 2) for k, v in parts.items()},
        # what bounds the batched path: the speedup if everything but the solver and the network
        # (state handling, conversions, loss, Python) cost nothing, and the rate its convolutions run at
        "bound_speedup_if_only_solver_and_network": round(speedup * wall_b / (solver_b + net_b), 2),
        "batched_network_gflop_per_step": round(gflop, 3),
        "batched_network_gflop_per_s": round(gflop / net_b, 1),
        "wide_conv_gflop_per_s": round(wide_conv_gflop_per_s(), 1),
        "timed_calls_each_interleaved": reps,
        "load_average": open("/proc/loadavg").read().split()[:3],
    }
    if t_ranks is not None:
        out["queries_per_s"][f"{world}_ranks"] = round(n / t_ranks, 1)
        out[f"speedup_{world}_ranks_vs_1"] = round(t_batched / t_ranks, 2)
        out[f"speedup_{world}_ranks_vs_loop"] = round(t_loop / t_ranks, 2)  # the loop runs on one core
        split, machine = t_batched / t_share, t_batched / t_concurrent
        out[f"{world}_ranks_breakdown"] = {
            "one_share_alone_seconds": round(t_share, 4),
            "ideal_speedup_from_the_split": round(split, 2),  # 1 process: all queries / one rank's share
            "shares_run_concurrently_seconds": round(t_concurrent, 4),
            "machine_ceiling_speedup": round(machine, 2),  # the shares in independent processes at once
            "communication_seconds": round(t_ranks - t_concurrent, 4),  # the rest: broadcast, all-reduce
        }
        out["why"] = (
            f"{world} ranks reach {t_batched / t_ranks:.2f}x; {world} independent processes running the same shares "
            f"at the same time reach {machine:.2f}x (alone, one share is {split:.2f}x faster than all of them), "
            f"the rest (broadcast, all-reduce, timing noise) is {1e3 * (t_ranks - t_concurrent):+.0f} ms per call"
        )
    return out


def classify_allocator(runs: int) -> dict:
    """Default `deepzero-task classify` wall time without and with the allocator setting, alternated."""
    walls: dict[str, list[float]] = {"without": [], "with": []}
    cli = [sys.executable, "-m", "deepzero_apps.cli", "classify", "progress=false"]
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(runs):
            for label, flag in (("without", "0"), ("with", "1")):
                env = {**os.environ, "DEEPZERO_MALLOC_TUNING": flag}
                t0 = time.perf_counter()
                subprocess.run(
                    [*cli, f"hydra.run.dir={tmp}/{label}{i}"], env=env, check=True, capture_output=True
                )
                walls[label].append(round(time.perf_counter() - t0, 1))
    mean = {k: sum(v) / len(v) for k, v in walls.items()}
    return {
        "problem": "classify_allocator",
        "command": "deepzero-task classify progress=false (default config)",
        "wall_seconds": walls,
        "speedup_with_vs_without": round(mean["without"] / mean["with"], 2),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", nargs="+", default=["burgers", "wake"], choices=["burgers", "wake"])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--reps", type=int, default=3, help="timed calls of each path, interleaved (best of)")
    p.add_argument("--classify-runs", type=int, default=2, help="alternated pairs of classify runs (0: skip)")
    args = p.parse_args(argv)
    tune_malloc()  # as every deepzero-task run
    for name in args.problems:
        print(json.dumps(bench(name, args.ranks, args.reps)), flush=True)
    if args.classify_runs:
        print(json.dumps(classify_allocator(args.classify_runs)), flush=True)


if __name__ == "__main__":
    main()
