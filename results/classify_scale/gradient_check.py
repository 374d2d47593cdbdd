#!/usr/bin/env python3
"""How close is dense CGE to the true gradient on classify_scale's model? (results/classify_scale/README.md)

Dense CGE as the runs use it (float32, forward differences, mu = 5e-3, the batched evaluator) against autograd on
the same 32 training images, at the seed-0 initial weights and at a run's final weights; one JSON line each.

usage: python results/classify_scale/gradient_check.py ROOT [RUN_DIR ...] > results/classify_scale/gradient_check.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from deepzero_apps.checkpoint import load_checkpoint
from deepzero_apps.data import build_datasets
from deepzero_apps.engine import CGE, StagedObjective
from deepzero_apps.models import create_model


def flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="the CIFAR-10 ImageFolder tree the runs trained on")
    ap.add_argument("runs", nargs="*", type=Path, help="run directories whose checkpoint.pt to check")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = build_datasets("imagefolder", args.root, train_limit=6400, test_limit=100, seed=0)
    for weights in ["init", *args.runs]:
        for batch_seed in (0, 1):
            torch.manual_seed(0)  # the seed-0 initial weights, as the runs draw them
            model = create_model("small_cnn", depth=4, channels=24, in_channels=3, num_classes=10)
            if weights != "init":
                model.load_state_dict(load_checkpoint(weights / "checkpoint.pt")["model"])
            idx = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(batch_seed))[:32]
            x = torch.stack([data.train[i][0] for i in idx])
            y = torch.tensor([int(data.train[i][1]) for i in idx])
            truth_model = copy.deepcopy(model)
            F.cross_entropy(truth_model(x), y).backward()
            truth = flat_grad(truth_model)
            CGE(mu=5e-3, evaluator="batched").estimate(StagedObjective(model, lambda out, b: F.cross_entropy(out, b[1])), (x, y))
            est = flat_grad(model)
            print(json.dumps({
                "weights": "init" if weights == "init" else f"{weights.parent.name}/{weights.name}", "batch_seed": batch_seed,
                "cosine": round(F.cosine_similarity(est.double(), truth.double(), dim=0).item(), 5),
                "relative_error": round(((est - truth).norm() / truth.norm()).item(), 4),
            }), flush=True)


if __name__ == "__main__":
    main()
