"""Peer line: the engine's CGE step vs torchzero's finite-difference optimizer (FDM) on the same step.

Same model, batch and perturbation as `cge_throughput.py`'s `small_cnn` case (depth 2, 18 channels,
3,376 parameters, the first 128 sklearn digits); both estimate every coordinate by forward
differences with the same step h = mu. One JSON line with each one's seconds per step (interleaved over
`--rounds`, wall and CPU time, the first round untimed), the speedup, and the cosine between the two
gradient estimates (they estimate the same finite differences, so it should be ~1).

torchzero is an optional dependency of this benchmark only (`pip install torchzero`), not of the
package. Its gradient is read back from one `tz.m.LR(lr)` step: (before - after) / lr.

    python benchmarks/peer_torchzero.py --rounds 3
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from importlib.metadata import version

import torch
from cge_throughput import setup

from deepzero_apps.allocator import tune_malloc
from deepzero_apps.engine import CGE

MU, LR = 5e-3, 1e-3


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    try:
        import torchzero as tz
    except ImportError:
        raise SystemExit("peer_torchzero.py needs torchzero: pip install torchzero") from None
    tune_malloc()
    torch.set_num_threads(1)
    load_before = open("/proc/loadavg").read().split()[:3]
    obj, batch, _ = setup("small_cnn", 0, seed=0)
    peer_model = copy.deepcopy(obj.module)
    params = list(peer_model.parameters())
    peer = tz.Optimizer(params, tz.m.FDM(h=MU, formula="forward"), tz.m.LR(LR))
    estimator = CGE(mu=MU, evaluator="batched")

    def closure(backward: bool = True) -> torch.Tensor:
        return obj.loss_fn(peer_model(batch[0]), batch)

    def engine() -> torch.Tensor:
        estimator.estimate(obj, batch)
        return torch.cat([q.grad.flatten() for q in obj.module.parameters()])

    def torchzero() -> torch.Tensor:
        before = torch.cat([q.detach().flatten() for q in params])
        peer.step(closure)
        after = torch.cat([q.detach().flatten() for q in params])
        for q, b in zip(params, before.split([q.numel() for q in params])):  # same point every round
            q.data.copy_(b.view_as(q))
        return (before - after) / LR

    seconds: dict[str, list[tuple[float, float]]] = {"engine": [], "torchzero": []}
    grads = {}
    for r in range(args.rounds + 1):
        for name, fn in (("engine", engine), ("torchzero", torchzero)):
            w, c = time.perf_counter(), time.process_time()
            grads[name] = fn()
            if r:
                seconds[name].append((time.perf_counter() - w, time.process_time() - c))

    def mean(name: str, i: int) -> float:
        return sum(s[i] for s in seconds[name]) / len(seconds[name])

    out = {
        "model": "small_cnn depth 2, 18 channels (digits 1x8x8)",
        "parameters": obj.coords.dim,
        "batch": int(batch[0].shape[0]),
        "h": MU,
        "torchzero": version("torchzero"),
        "seconds_per_step_wall": {k: round(mean(k, 0), 3) for k in seconds},
        "seconds_per_step_cpu": {k: round(mean(k, 1), 3) for k in seconds},
        "speedup_engine_vs_torchzero_cpu": round(mean("torchzero", 1) / mean("engine", 1), 1),
        "speedup_engine_vs_torchzero_wall": round(mean("torchzero", 0) / mean("engine", 0), 1),
        "gradient_cosine": round(float(torch.nn.functional.cosine_similarity(grads["engine"], grads["torchzero"], dim=0)), 6),
        "load_average": {"before": load_before, "after": open("/proc/loadavg").read().split()[:3]},
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
