#!/usr/bin/env python3
"""Score every finished classify run's final weights on a whole test set (results/sparsity/README.md).

The runs evaluate each epoch on a small test subset to stay cheap on a shared CPU; this decodes the test set
once and writes RUN/full_test.json ({"test_acc", "test_loss", "n", "correct"}) beside each run's summary.json,
skipping runs that already have one (--force rescores). "correct" holds one 0/1 character per test image in the
ImageFolder's order (sorted paths), so two runs' tables pair by image. The model is rebuilt from the run's own
.hydra/config.yaml.

usage: sparsity_full_test.py ROOT RUN_DIR [RUN_DIR ...] [--cache FILE] [--force]   (ROOT: the tree the runs trained on;
       --cache: keep the decoded test set in FILE, outside the repository, for the next call)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from deepzero_apps.checkpoint import load_checkpoint
from deepzero_apps.data import build_datasets
from deepzero_apps.models import create_model


@torch.no_grad()
def score(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> dict[str, float | int | str]:
    model.eval()
    hits, loss = [], 0.0
    for i in range(0, len(y), batch):
        logits = model(x[i : i + batch])
        loss += float(F.cross_entropy(logits, y[i : i + batch], reduction="sum"))
        hits.append(logits.argmax(1) == y[i : i + batch])
    correct = torch.cat(hits)
    return {"test_acc": int(correct.sum()) / len(y), "test_loss": loss / len(y), "n": len(y),
            "correct": "".join("1" if c else "0" for c in correct.tolist())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root")
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--force", action="store_true", help="rescore runs that already have full_test.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    todo = [r for r in args.runs if (r / "summary.json").exists() and (args.force or not (r / "full_test.json").exists())]
    if not todo:
        return
    data = build_datasets("imagefolder", args.root)
    if args.cache is not None and args.cache.exists():
        x, y = torch.load(args.cache, weights_only=True)
    else:
        x, y = (torch.cat(t) for t in zip(*DataLoader(data.test, batch_size=1000)))
        if args.cache is not None:
            torch.save((x, y), args.cache)
    for run in todo:
        cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
        spec = OmegaConf.to_container(cfg.model, resolve=True)
        spec = {k: v for k, v in spec.items() if not k.startswith("_")}
        model = create_model(spec.pop("name"), **spec, in_channels=data.in_channels, num_classes=data.num_classes)
        model.load_state_dict(load_checkpoint(run / "checkpoint.pt")["model"])
        result = score(model, x, y)
        (run / "full_test.json").write_text(json.dumps(result) + "\n")
        print(f"{run.name}: test_acc={result['test_acc']:.4f} on {result['n']:,}")


if __name__ == "__main__":
    main()
