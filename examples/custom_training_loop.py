"""The engine on your own model in your own training loop (the README's snippet, runnable).

A user-defined `nn.Sequential` (its children are the stages feature reuse restarts from) is trained
on scikit-learn's 8x8 digits with forward CGE: every step fills `p.grad` from d + 1 loss queries, and
an ordinary `torch.optim` optimizer steps on it. Prints one JSON line.

    python examples/custom_training_loop.py --steps 30
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from deepzero_apps.engine import CGE, StagedObjective


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny ops: more only contend)")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    x_train, y_train, x_test, y_test = x[:1500], y[:1500], x[1500:], y[1500:]

    model = nn.Sequential(  # your model: two stages
        nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Flatten(), nn.Linear(64, 10)),
    )
    objective = StagedObjective(model, lambda logits, batch: F.cross_entropy(logits, batch[1]))
    estimator = CGE(mu=5e-3, evaluator="batched")  # exact fast paths; "reuse" (the default) equals it, slower
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)

    def accuracy() -> float:
        with torch.no_grad():
            return float((model(x_test).argmax(1) == y_test).float().mean())

    before = accuracy()
    gen = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        idx = torch.randint(len(x_train), (args.batch_size,), generator=gen)
        optimizer.zero_grad()
        loss = estimator.estimate(objective, (x_train[idx], y_train[idx]), step=step)  # fills p.grad
        optimizer.step()
    result = {
        "example": "custom_training_loop", "steps": args.steps, "parameters": objective.coords.dim,
        "last_loss": round(loss, 4), "test_acc_before": round(before, 4), "test_acc": round(accuracy(), 4),
        "queries": objective.counter.queries, "forward_equivalents": round(objective.counter.forward_equivalents, 1),
    }  # fmt: skip
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
