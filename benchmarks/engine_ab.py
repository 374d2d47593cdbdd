"""A/B of an engine change: this checkout's batched evaluator against another commit's, in one process.

Machine speed drifts on a shared host (the official worker's rate moved from 70 to 60 coordinates/s
between two quiet runs), so two benchmark runs of two commits do not isolate a change. This script
extracts `deepzero_apps/engine/` of `--against REV` (git) into a temporary package, teaches it the
bundled models' structures, and times both engines round by round on the same ResNet-20 coordinates and
batch as `cge_throughput.py` (optionally with the official DeepZero worker in the same rounds), one
thread. One JSON line: this checkout's commit, coordinates/s per round and best of rounds, the ratios, the
largest difference between the two engines' losses, and the load average.

    python benchmarks/engine_ab.py --against b628ae7 --rounds 4 --official ~/DeepZero
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

sys.path.insert(0, str(Path(__file__).parent))
from cge_throughput import STEP, _Here, ce, official_worker, setup  # noqa: E402

from deepzero_apps.allocator import tune_malloc  # noqa: E402
from deepzero_apps.engine import BatchedEvaluator, frozen_running_stats  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def engine_at(rev: str, into: Path) -> ModuleType:
    """`deepzero_apps/engine` as of `rev`, importable as `engine_<rev>` (its `..` imports point at this
    checkout's package), with the bundled structures registered as `models/structures.py` does."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "deepzero_apps/engine", "deepzero_apps/models/structures.py"],
        check=True, capture_output=True,
    ).stdout  # fmt: skip
    name = "engine_" + re.sub(r"\W", "_", rev)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for member in tar.getmembers():
            if member.isfile():
                text = tar.extractfile(member).read().decode()
                text = re.sub(r"^(\s*)from \.\.(\w+) import", r"\1from deepzero_apps.\2 import", text, flags=re.M)
                text = text.replace("deepzero_apps.engine", name)
                if member.name.endswith("structures.py"):  # its relative model imports: this checkout's
                    text = text.replace("from .", "from deepzero_apps.models.")
                    dest = into / name / "_structures.py"
                else:
                    dest = into / name / Path(member.name).relative_to("deepzero_apps/engine")
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_text(text)
    sys.path.insert(0, str(into))
    module = importlib.import_module(name)
    importlib.import_module(f"{name}._structures")
    return module


def this_commit() -> str:
    """HEAD, marked dirty when the engine has uncommitted changes (then the A side is not a commit)."""
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True)
    dirty = subprocess.run([*git, "status", "--porcelain", "deepzero_apps"], capture_output=True, text=True)
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", required=True, metavar="REV", help="git revision whose engine is B")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--sample", type=int, default=2000, help="random ResNet-20 coordinates")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--official", metavar="PATH", help="a checkout of OPTML-Group/DeepZero: time its worker too")
    args = p.parse_args(argv)
    tune_malloc()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        other = engine_at(args.against, Path(tmp))
        obj, b, coords = setup("resnet20", args.sample, args.seed)
        runs = {"this": (BatchedEvaluator(), obj), args.against: (other.BatchedEvaluator(), other.StagedObjective(obj.module, ce))}
        timed: dict[str, list[float]] = {"official": []} if args.official else {}
        timed |= {k: [] for k in runs}
        worker = official_worker(args.official, obj, coords) if args.official else None
        losses, contexts = {}, {}
        with torch.no_grad(), frozen_running_stats(obj.module):
            for k, (ev, o) in runs.items():
                contexts[k] = ev.base(o, b)[1]
                for _ in range(2):  # chunk-size tuning, as every benchmark's warm-up
                    ev.coordinate_losses(o, b, contexts[k], coords, STEP)
            for _ in range(args.rounds):
                if worker is not None:
                    t0 = time.perf_counter()
                    worker.calculate_grads(_Here(b[0]), _Here(b[1]), STEP)
                    timed["official"].append(time.perf_counter() - t0)
                for k, (ev, o) in runs.items():
                    t0 = time.perf_counter()
                    losses[k] = ev.coordinate_losses(o, b, contexts[k], coords, STEP)
                    timed[k].append(time.perf_counter() - t0)
    best = {k: len(coords) / min(v) for k, v in timed.items()}
    out = {
        "model": "resnet20", "batch": int(b[0].shape[0]), "coordinates": len(coords), "this": this_commit(),
        "against": args.against,
        "coords_per_s_per_round": {k: [round(len(coords) / t, 1) for t in v] for k, v in timed.items()},
        "coords_per_s_best": {k: round(v, 1) for k, v in best.items()},
        "this_vs_against": round(best["this"] / best[args.against], 3),
        "max_abs_loss_difference": float(f"{(losses['this'] - losses[args.against]).abs().max():.3g}"),
        "load_average": os.getloadavg(),
    }  # fmt: skip
    if worker is not None:
        out["vs_official"] = {k: round(best[k] / best["official"], 2) for k in runs}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    sys.exit(main())
