"""Train a torch network through a scipy ODE solver it cannot differentiate (`zo_function`).

A small network reads two features of a damped oscillator and predicts its physical parameters
(angular frequency w, damping ratio zeta); `scipy.integrate.odeint` simulates each prediction, and
the loss compares the simulated trajectory with the observed one. The solver is a numpy black box:
`zo_function` makes it a torch function whose backward is a zeroth-order VJP (central CGE over each
sample's two parameters: 5 solver calls of the batch per step), while the network itself is trained
by ordinary backprop and `torch.optim`. Prints one JSON line.

    python examples/zo_function_scipy.py --steps 150
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F
from scipy.integrate import odeint
from torch import nn

from deepzero_apps.engine import CGE, zo_function

TIMES = np.linspace(0.0, 6.0, 25)


def simulate(params: np.ndarray) -> np.ndarray:
    """x(t) at TIMES of x'' + 2 zeta w x' + w^2 x = 0, x(0) = 1, x'(0) = 0, one row per (w, zeta)."""

    def one(w: float, zeta: float) -> np.ndarray:
        rhs = lambda s, t: [s[1], -2 * zeta * w * s[1] - w * w * s[0]]  # noqa: E731
        return odeint(rhs, [1.0, 0.0], TIMES, rtol=1e-10, atol=1e-12)[:, 0]

    return np.stack([one(w, zeta) for w, zeta in params])


def true_params(features: torch.Tensor) -> torch.Tensor:
    """The mapping the network has to learn: w in [1, 3], zeta in [0.1, 0.5]."""
    return torch.stack([1.0 + 2.0 * features[:, 0], 0.1 + 0.4 * features[:, 1]], 1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)

    features = torch.rand(128, 2, dtype=torch.float64)
    observed = torch.as_tensor(simulate(true_params(features).numpy()))
    net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2), nn.Softplus()).double()
    solver = zo_function(simulate, CGE(mu=1e-4, scheme="central"), per_sample=True, numpy=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.02)

    def param_error() -> float:
        with torch.no_grad():
            return float((net(features) - true_params(features)).abs().mean())

    error_before = param_error()
    gen = torch.Generator().manual_seed(args.seed)
    losses = []
    for _ in range(args.steps):
        idx = torch.randint(len(features), (args.batch_size,), generator=gen)
        optimizer.zero_grad()
        loss = F.mse_loss(solver(net(features[idx])), observed[idx])  # the solver is a black box
        loss.backward()  # exact through the network, ZO through the solver
        optimizer.step()
        losses.append(loss.item())
    head = max(1, len(losses) // 10)
    result = {
        "example": "zo_function_scipy", "steps": args.steps,
        "loss_first": round(float(np.mean(losses[:head])), 5), "loss_last": round(float(np.mean(losses[-head:])), 5),
        "param_error_before": round(error_before, 4), "param_error": round(param_error(), 4),
        "solver_queries": solver.counter.queries,
    }  # fmt: skip
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
