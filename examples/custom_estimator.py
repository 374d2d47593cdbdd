"""A custom estimator in twenty lines: RGE along random sign (Rademacher) directions.

An estimator is any object with `estimate(objective, batch, coords=None, step=0) -> base loss`
that fills `p.grad`. This one asks its evaluator for the losses along q sign vectors s_i in
{-1, +1}^d (E[s s^T] = I, so no scaling is needed) and combines them with the shared ZO core's
finite difference, with its queries in full float32 precision as the built-in estimators run
them (`full_precision`). It works with sparse coordinates, BatchNorm, the Trainer and torchrun (a
`ShardedEvaluator` deals its directions over the ranks). The script checks it against backprop on
one batch, then trains the bundled small CNN on 8x8 digits with it. Prints one JSON line.

    python examples/custom_estimator.py --steps 100
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from deepzero_apps.engine import (
    FirstOrder,
    StagedObjective,
    difference,
    direction_seed,
    frozen_running_stats,
    full_precision,
    make_evaluator,
)
from deepzero_apps.models import create_model


class RademacherRGE:
    """g = (1/q) sum_i [(f(theta + mu s_i) - f(theta)) / mu] s_i over q random sign vectors s_i."""

    def __init__(self, q: int = 32, mu: float = 5e-3, seed: int = 0, evaluator: str = "reuse"):
        self.q, self.mu, self.seed, self.evaluator = q, mu, seed, make_evaluator(evaluator)

    def estimate(self, objective, batch, coords=None, step=0) -> float:
        view, ev = objective.coords, self.evaluator
        d, like = (view.dim if coords is None else len(coords)), view.blocks[0].param
        gen = torch.Generator().manual_seed(direction_seed(self.seed, step, 0))  # replayable per step
        signs = [(torch.randint(0, 2, (d,), generator=gen) * 2 - 1).to(like) for _ in range(self.q)]
        with torch.no_grad(), full_precision():  # no autocast/TF32 rounding of the perturbations
            f0, context = ev.base(objective, batch)
            with frozen_running_stats(objective.module):
                plus = ev.direction_losses(objective, batch, context, signs, coords, self.mu)
            coefs = difference(plus, float(f0), self.mu, "forward")
            grad = sum(c * s.double() for c, s in zip(coefs.tolist(), signs)) / self.q
        view.write_grad(grad, coords)
        return float(f0)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--q", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float64).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    model = create_model("small_cnn", depth=1, in_channels=1, num_classes=10, channels=4).double()
    objective = StagedObjective(model, lambda logits, batch: F.cross_entropy(logits, batch[1]))
    params = [b.param for b in objective.coords.blocks]

    def grad_after(estimator, batch) -> torch.Tensor:
        estimator.estimate(objective, batch)
        return torch.cat([p.grad.reshape(-1) for p in params])

    check = (x[:64], y[:64])  # q = 4d directions on one batch: cosine about sqrt(q / (q + d)) ~ 0.89
    cosine = F.cosine_similarity(grad_after(RademacherRGE(q=4 * objective.coords.dim, mu=1e-6), check),
                                 grad_after(FirstOrder(), check), dim=0)
    estimator, optimizer = RademacherRGE(q=args.q, seed=args.seed), torch.optim.Adam(params, lr=0.01)
    gen = torch.Generator().manual_seed(args.seed)
    losses = []
    for step in range(args.steps):
        idx = torch.randint(len(x), (32,), generator=gen)
        optimizer.zero_grad()
        losses.append(estimator.estimate(objective, (x[idx], y[idx]), step=step))
        optimizer.step()
    head = max(1, len(losses) // 10)
    result = {
        "example": "custom_estimator", "parameters": objective.coords.dim, "q": args.q,
        "cosine_to_backprop": round(float(cosine), 4), "steps": args.steps,
        "loss_first": round(sum(losses[:head]) / head, 4), "loss_last": round(sum(losses[-head:]) / head, 4),
    }  # fmt: skip
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
