"""Coordinates per second of the classify training loop beside the engine benchmark's, same model and batch.

The model is the paper's small CNN at the size of the classify-scale protocol (depth 4, 28 channels,
22,550 parameters, 3x32x32 input, batch 64); every step is dense CGE with the CLI's defaults
(`estimator=cge`: forward differences, mu 0.005, the batched evaluator; SGD). Two figures, interleaved
in one process (`--rounds` pairs, the first pair untimed: chunk tuning):

  engine:  `BatchedEvaluator.coordinate_losses` on all coordinates, as `cge_throughput.py` times it;
  trainer: `Trainer.fit` over `--steps` steps of a TensorDataset (estimate, optimizer step, finiteness
           checks, scheduler, metrics row, end-of-epoch checkpoint), per step.

Each is reported in wall-clock and in CPU-time coordinates/s: on a machine shared with other jobs the
CPU-time figure is the one that compares (the wall figure depends on what else ran at that moment);
`load_average` is /proc/loadavg before and after. A trainer much slower than the engine is a slow path.

    python benchmarks/trainer_throughput.py --rounds 3 --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from deepzero_apps.allocator import tune_malloc
from deepzero_apps.engine import CGE, BatchedEvaluator, StagedObjective, frozen_running_stats
from deepzero_apps.models import create_model
from deepzero_apps.trainer import Trainer, TrainerConfig

MU = 0.005  # configs/shared/estimator/cge.yaml


def ce(out: torch.Tensor, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(out, b[1])


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of fn()."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="timed (engine, trainer) pairs after an untimed one")
    p.add_argument("--steps", type=int, default=2, help="training steps per trainer round")
    p.add_argument("--channels", type=int, default=28)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args(argv)
    tune_malloc()  # as every deepzero-task run
    torch.set_num_threads(1)  # the CLI's threads=1
    load_before = open("/proc/loadavg").read().split()[:3]
    torch.manual_seed(0)
    model = create_model("small_cnn", depth=4, in_channels=3, num_classes=10, channels=args.channels)
    obj = StagedObjective(model, ce)
    x, y = torch.randn(args.steps * args.batch, 3, 32, 32), torch.randint(0, 10, (args.steps * args.batch,))
    batch = (x[: args.batch], y[: args.batch])
    all_coords = torch.arange(obj.coords.dim)
    estimator = CGE(mu=MU, evaluator=BatchedEvaluator())  # one evaluator: its tuned chunks carry over

    def engine() -> None:
        ev = estimator.evaluator
        with torch.no_grad():
            _, ctx = ev.base(obj, batch)
            with frozen_running_stats(model):
                ev.coordinate_losses(obj, batch, ctx, all_coords, MU)

    def trainer() -> None:
        with tempfile.TemporaryDirectory() as out:
            Trainer(
                obj, estimator, torch.optim.SGD(model.parameters(), lr=1e-3), TensorDataset(x, y),
                evaluate=dict, out_dir=out, config=TrainerConfig(epochs=1, batch_size=args.batch, progress=False),
            ).fit()

    runs: dict[str, list[tuple[float, float]]] = {"engine": [], "trainer": []}
    for r in range(args.rounds + 1):
        e, t = timed(engine), timed(trainer)
        if r:
            runs["engine"].append(e)
            runs["trainer"].append((t[0] / args.steps, t[1] / args.steps))
    d = obj.coords.dim

    def rate(kind: str, i: int) -> float:
        return round(d / (sum(s[i] for s in runs[kind]) / len(runs[kind])), 1)

    out = {
        "model": f"small_cnn depth 4, {args.channels} channels",
        "parameters": d,
        "input": [3, 32, 32],
        "batch": args.batch,
        "threads": 1,
        "coords_per_s_wall": {"engine": rate("engine", 0), "trainer": rate("trainer", 0)},
        "coords_per_s_cpu": {"engine": rate("engine", 1), "trainer": rate("trainer", 1)},
        "trainer_vs_engine_cpu": round(rate("trainer", 1) / rate("engine", 1), 3),
        "seconds": {k: [[round(a, 2), round(b, 2)] for a, b in v] for k, v in runs.items()},
        "load_average": {"before": load_before, "after": open("/proc/loadavg").read().split()[:3]},
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
