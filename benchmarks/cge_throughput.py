"""CGE coordinate throughput: reference loop, reuse loop, batched engine, engine on 2 ranks.

One JSON line per model with coordinates/second for
  (a) reference: every coordinate reruns the whole model (no feature reuse);
  (b) reuse: one coordinate per forward restarted at its stage (the official DeepZero worker's
      algorithm, reimplemented here; --official PATH also times the official code itself on ResNet-20);
  (b_cl) the same reuse loop with the model in channels_last, to separate layout from algorithm;
  (c) engine: BatchedEvaluator in one process with 1 thread, and (c_2threads) with 2 threads;
  (d) engine on --ranks processes (1 thread each, gloo), ShardedEvaluator(BatchedEvaluator()).
Also reported: conv/matmul FLOPs per coordinate of (a), (b) and (c) (torch's FlopCounterMode on the
reference subsample), the work each algorithm does independent of how fast this CPU runs it; the
GFLOP/s each algorithm reaches on that work; and the GFLOP/s of each of the model's convolutions run
alone on a batch of 256 (the rate this core runs them at: how far an algorithm is from it).
Engine figures are steady state: untimed calls (chunk-size tuning, shard timing) precede the timed one,
as in training where every step after the first reuses them. Every evaluator runs the same
coordinates on the same batch; the reference loop runs a uniform subsample of them.

    python benchmarks/cge_throughput.py                       # both models, 2 ranks
    python benchmarks/cge_throughput.py --models small_cnn --ranks 2
    python benchmarks/cge_throughput.py --models resnet20 --ranks 1 --official ~/DeepZero  # a git clone
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from deepzero_apps.allocator import tune_malloc
from deepzero_apps.engine import (
    BatchedEvaluator,
    FeatureReuse,
    ReferenceEvaluator,
    ShardedEvaluator,
    StagedObjective,
    frozen_running_stats,
    init_distributed,
    rank,
)
from deepzero_apps.models import create_model

STEP = 5e-3


def ce(out: torch.Tensor, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(out, b[1])


def setup(name: str, sample: int, seed: int, channels_last: bool = False):
    """Model, batch and coordinates of one benchmark case (identical in every process)."""
    torch.manual_seed(seed)
    if name == "small_cnn":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images[:128], dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target[:128])
        model = create_model("small_cnn", depth=2, in_channels=1, num_classes=10, channels=18)
    else:
        x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
        model = create_model("resnet20")
    if channels_last:  # NHWC input makes every activation NHWC (weights stay contiguous: flat coordinates)
        x = x.contiguous(memory_format=torch.channels_last)
    obj = StagedObjective(model, ce)
    g = torch.Generator().manual_seed(seed)
    coords = torch.arange(obj.coords.dim)
    if sample and sample < obj.coords.dim:
        coords = torch.randperm(obj.coords.dim, generator=g)[:sample].sort().values
    return obj, (x, y), coords


def timed_call(
    ev: ReferenceEvaluator, obj: StagedObjective, b, coords: torch.Tensor, warmup: int = 0, reps: int = 1
) -> dict:
    """Seconds of one coordinate_losses call (after `warmup` untimed ones), total and per stage,
    each the median of `reps` timed passes."""
    with torch.no_grad():
        _, ctx = ev.base(obj, b)
        with frozen_running_stats(obj.module):
            for _ in range(warmup):
                ev.coordinate_losses(obj, b, ctx, coords, STEP)
            stages = obj.coords.stage_of(coords)
            times: dict[int, list[float]] = {s: [] for s in stages.unique().tolist()}
            for _ in range(reps):
                for s, t in times.items():
                    t0 = time.perf_counter()
                    ev.coordinate_losses(obj, b, ctx, coords[stages == s], STEP)
                    t.append(time.perf_counter() - t0)
    per_stage = {s: statistics.median(t) for s, t in times.items()}
    return {"seconds": sum(per_stage.values()), "per_stage": per_stage, "n": len(coords)}


def reps_for(seconds_per_call: float, min_seconds: float = 3.0) -> int:
    """Timed repetitions of a call so that short calls are measured over at least `min_seconds`."""
    return max(1, math.ceil(min_seconds / seconds_per_call))


def flops_per_coordinate(ev: ReferenceEvaluator, obj: StagedObjective, b, coords: torch.Tensor) -> float:
    """conv/matmul FLOPs of one steady-state coordinate_losses call on `coords` (the trace of its step
    included), per coordinate. One uncounted call comes first, as before every timing: the
    batched evaluator's one-time work (the check on a parameter's first use that nothing reads it
    after its layer, two forwards of the later stages per tensor) is not the per-step cost."""
    with torch.no_grad(), frozen_running_stats(obj.module):
        _, ctx = ev.base(obj, b)
        ev.coordinate_losses(obj, b, ctx, coords, STEP)
        _, ctx = ev.base(obj, b)
        with FlopCounterMode(display=False) as counter:
            ev.coordinate_losses(obj, b, ctx, coords, STEP)
    return counter.get_total_flops() / len(coords)


def conv_rates(model: torch.nn.Module, x: torch.Tensor, batch: int = 256) -> dict[str, int]:
    """GFLOP/s of each distinct convolution of `model` run alone on `batch` NHWC inputs (one thread): the
    rate this CPU runs the model's convolutions at, beside the rates the evaluators reach."""
    convs: dict[str, tuple[torch.nn.Module, torch.Size]] = {}

    def record(m, inputs, _):
        c, h, w = inputs[0].shape[1:]
        convs.setdefault(f"{c}->{m.out_channels} k{m.kernel_size[0]} s{m.stride[0]} {h}x{w}", (m, inputs[0].shape[1:]))

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad(), frozen_running_stats(model):
        model(x[:1])
    for h in hooks:
        h.remove()
    rates = {}
    with torch.no_grad():
        for key, (m, shape) in convs.items():
            xin = torch.randn(batch, *shape).contiguous(memory_format=torch.channels_last)
            with FlopCounterMode(display=False) as counter:
                m(xin)
            best = float("inf")
            for _ in range(4):
                t0 = time.perf_counter()
                m(xin)
                best = min(best, time.perf_counter() - t0)
            rates[key] = round(counter.get_total_flops() / best / 1e9)
    return rates


def rate(m: dict) -> float:
    return m["n"] / m["seconds"]


def _rank_worker(
    r: int, world: int, port: int, name: str, sample: int, seed: int, malloc: bool, reps: int, queue
) -> None:
    if malloc:
        tune_malloc()
    os.environ.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    init_distributed()
    try:
        obj, b, coords = setup(name, sample, seed)
        ev = ShardedEvaluator(BatchedEvaluator())
        with torch.no_grad():
            _, ctx = ev.base(obj, b)
            with frozen_running_stats(obj.module):
                for _ in range(4):  # chunk tuning and shard timing settle, as in the first training steps
                    ev.coordinate_losses(obj, b, ctx, coords, STEP)
                times = []
                for _ in range(reps):
                    dist.barrier()
                    t0 = time.perf_counter()
                    ev.coordinate_losses(obj, b, ctx, coords, STEP)
                    times.append(time.perf_counter() - t0)
                seconds = statistics.median(times)
        busy = [None] * world
        dist.all_gather_object(busy, ev.last_busy_seconds)
        if rank() == 0:
            queue.put({"seconds": seconds, "n": len(coords), "busy_per_rank": busy})
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ranks_call(name: str, sample: int, seed: int, world: int, malloc: bool, reps: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(
        _rank_worker, args=(world, free_port(), name, sample, seed, malloc, reps, queue), nprocs=world, join=True
    )
    return queue.get()


def _copy_worker(r: int, name: str, sample: int, seed: int, malloc: bool, reps: int, queue) -> None:
    if malloc:
        tune_malloc()
    torch.set_num_threads(1)
    obj, b, coords = setup(name, sample, seed)
    queue.put(rate(timed_call(BatchedEvaluator(), obj, b, coords, warmup=2, reps=reps)))


def parallel_capacity(name: str, sample: int, seed: int, world: int, malloc: bool, reps: int) -> float:
    """Combined throughput of `world` independent one-process engines running at once, relative to
    one alone: the speedup this machine allows N ranks before any sharding cost (shared cores,
    caches and memory bandwidth make it less than N)."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(_copy_worker, args=(name, sample, seed, malloc, reps, queue), nprocs=world, join=True)
    return sum(queue.get() for _ in range(world))


def with_threads(n: int, fn: Callable[[], dict]) -> dict:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


class _Here:
    """Stands in for an rpc.RRef in-process: the official worker only calls to_here()."""

    def __init__(self, value):
        self.value = value

    def to_here(self):
        return self.value


def official_worker(path: str, obj: StagedObjective, coords: torch.Tensor):
    """The official DeepZero worker (`DistributedCGEModel.calculate_grads`, feature reuse on) from a
    checkout at `path`, on a copy of `obj`'s ResNet-20 weights (same parameter order) and `coords`."""
    sys.path.insert(0, path)
    from models.distributed_model import DistributedCGEModel
    from models.resnet_s import param_name_to_module_id_rn20, resnet20

    worker = DistributedCGEModel("cpu", resnet20, F.cross_entropy, param_name_to_module_id_rn20, pruned=False)
    theirs, ours = list(worker.network.named_parameters()), list(obj.module.parameters())
    if [p.shape for _, p in theirs] != [p.shape for p in ours]:
        raise SystemExit(f"--official {path}: its resnet20 does not have this ResNet-20's parameters")
    with torch.no_grad():
        for (_, t), o in zip(theirs, ours):
            t.copy_(o)
    owner = torch.cat([torch.full((p.numel(),), i) for i, p in enumerate(ours)])
    start = torch.cumsum(torch.tensor([0] + [p.numel() for p in ours]), 0)
    instruction = torch.stack([owner[coords], coords - start[owner[coords]]], 1)
    worker.set_params_to_be_perturbed(_Here(instruction), [n for n, _ in theirs])
    return worker


def official_vs_engine(path: str, obj: StagedObjective, b, coords: torch.Tensor, rounds: int) -> dict:
    """The official worker and the engine on the same coordinates and batch, timed in turn (best of
    `rounds`, one thread), with the largest difference between their gradient estimates."""
    worker = official_worker(path, obj, coords)
    ev, x, y = BatchedEvaluator(), _Here(b[0]), _Here(b[1])
    best = {"official": float("inf"), "engine": float("inf")}
    with torch.no_grad(), frozen_running_stats(obj.module):
        f0, ctx = ev.base(obj, b)
        ev.coordinate_losses(obj, b, ctx, coords, STEP)  # chunk tuning, as timed_call's warmup
        ev.coordinate_losses(obj, b, ctx, coords, STEP)
        for _ in range(rounds):
            t0 = time.perf_counter()
            theirs = worker.calculate_grads(x, y, STEP)[:, 2]
            best["official"] = min(best["official"], time.perf_counter() - t0)
            t0 = time.perf_counter()
            ours = (ev.coordinate_losses(obj, b, ctx, coords, STEP) - float(f0)) / STEP
            best["engine"] = min(best["engine"], time.perf_counter() - t0)
    return {
        "coords_per_s": {k: round(len(coords) / v, 2) for k, v in best.items()},
        "engine_vs_official": round(best["official"] / best["engine"], 2),
        "max_abs_gradient_difference": float(f"{(ours - theirs.double()).abs().max():.3g}"),
        "gradient_cosine": round(float(F.cosine_similarity(ours, theirs.double(), dim=0)), 6),
        "rounds_interleaved": rounds,
    }


def bench(
    name: str, sample: int, reference_sample: int, seed: int, world: int, malloc: bool, official: str | None = None
) -> dict:
    obj, b, coords = setup(name, sample, seed)
    ref_coords = coords[
        torch.randperm(len(coords), generator=torch.Generator().manual_seed(seed))[:reference_sample]
    ]
    a = with_threads(1, lambda: timed_call(ReferenceEvaluator(), obj, b, ref_coords))
    bb = with_threads(1, lambda: timed_call(FeatureReuse(), obj, b, coords))
    obj_cl, b_cl, _ = setup(name, sample, seed, channels_last=True)
    bcl = with_threads(1, lambda: timed_call(FeatureReuse(), obj_cl, b_cl, coords))
    c = with_threads(1, lambda: timed_call(BatchedEvaluator(), obj, b, coords, warmup=2))
    reps = reps_for(c["seconds"])  # engine calls can be short: time them over several seconds
    if reps > 1:
        c = with_threads(1, lambda: timed_call(BatchedEvaluator(), obj, b, coords, warmup=2, reps=reps))
    c2 = with_threads(2, lambda: timed_call(BatchedEvaluator(), obj, b, coords, warmup=2, reps=reps))
    d = ranks_call(name, sample, seed, world, malloc, reps) if world > 1 else None
    copies = parallel_capacity(name, sample, seed, world, malloc, reps) if world > 1 else None
    flops = {
        label: flops_per_coordinate(ev, obj, b, ref_coords)
        for label, ev in (("a_reference", ReferenceEvaluator()), ("b_reuse", FeatureReuse()), ("c_engine", BatchedEvaluator()))
    }
    out = {
        "model": name,
        "batch": int(b[0].shape[0]),
        "coordinates": len(coords),
        "reference_subsample": len(ref_coords),
        "coords_per_s": {
            "a_reference": round(rate(a), 2),
            "b_reuse": round(rate(bb), 2),
            "b_reuse_channels_last": round(rate(bcl), 2),
            "c_engine_1thread": round(rate(c), 2),
            "c_engine_2threads": round(rate(c2), 2),
        },
        "speedup": {
            "engine_vs_reference": round(rate(c) / rate(a), 2),
            "engine_vs_reuse": round(rate(c) / rate(bb), 2),
            "engine_vs_reuse_channels_last": round(rate(c) / rate(bcl), 2),
            "2threads_vs_1thread": round(rate(c2) / rate(c), 2),
        },
        "conv_matmul_flops_per_coordinate": {k: float(f"{v:.4g}") for k, v in flops.items()},
        "flops_reuse_vs_engine": round(flops["b_reuse"] / flops["c_engine"], 2),
        "seconds_per_stage": {
            "b_reuse": {s: round(t, 3) for s, t in bb["per_stage"].items()},
            "c_engine_1thread": {s: round(t, 3) for s, t in c["per_stage"].items()},
        },
        "engine_timed_calls": reps,
        "malloc_tuned": malloc,
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    gflops = {"b_reuse": flops["b_reuse"] * rate(bb), "c_engine_1thread": flops["c_engine"] * rate(c)}
    if official and name == "resnet20":
        out["official_deepzero_worker"] = with_threads(1, lambda: official_vs_engine(official, obj, b, coords, 2))
        gflops["official_at_reuse_flops"] = flops["b_reuse"] * out["official_deepzero_worker"]["coords_per_s"]["official"]
    # where the time goes against the FLOP count: the rate each algorithm's conv/matmul work runs at,
    # and the rate the model's convolutions run at alone on a large batch (this core's ceiling for them)
    out["conv_matmul_gflop_per_s"] = {k: round(v / 1e9) for k, v in gflops.items()}
    out["model_convs_alone_gflop_per_s"] = with_threads(1, lambda: conv_rates(obj.module, b[0]))
    out["load_average"] = open("/proc/loadavg").read().split()[:3]
    if d is not None:
        out["coords_per_s"][f"d_engine_{world}ranks"] = round(rate(d), 2)
        out["speedup"][f"{world}ranks_vs_1rank"] = round(rate(d) / rate(c), 2)
        out["speedup"][f"{world}_independent_copies_vs_1"] = round(copies / rate(c), 2)
        out["d_busy_seconds_per_rank"] = [round(t, 3) for t in d["busy_per_rank"]]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--models", nargs="+", default=["small_cnn", "resnet20"], choices=["small_cnn", "resnet20"]
    )
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument(
        "--sample", type=int, default=2000, help="random coordinates for resnet20 (small_cnn: all)"
    )
    p.add_argument("--reference-sample", type=int, default=200, help="subsample for the slow reference loop")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-malloc-tuning", action="store_true", help="leave glibc's mmap threshold alone")
    p.add_argument(
        "--official",
        metavar="PATH",
        help="a checkout of github.com/OPTML-Group/DeepZero: also time its worker on ResNet-20 (not vendored)",
    )
    args = p.parse_args(argv)
    malloc = not args.no_malloc_tuning and tune_malloc()
    for name in args.models:
        sample = 0 if name == "small_cnn" else args.sample
        print(
            json.dumps(bench(name, sample, args.reference_sample, args.seed, args.ranks, malloc, args.official)), flush=True
        )


if __name__ == "__main__":
    sys.exit(main())
