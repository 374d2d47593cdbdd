"""Black boxes as autograd functions: `zo_function(fn)` is usable inside an ordinary torch graph.

    theta --autograd--> model --> x --ZO VJP--> [ fn: numpy/scipy, a process, a remote model ] --> loss

Forward calls the black box without autograd. Backward estimates the vector-Jacobian product with
respect to the input from queries of `fn` alone: for y = fn(x) and the upstream gradient v,
VJP = grad_x <v, fn(x)>, a gradient of one scalar per query, estimated by the engine's CGE (over
the input's coordinates) or RGE (random directions in input space) through the shared ZO core.
The rest of the graph (white-box layers before and after) is differentiated exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from deepzero_apps.errors import RunError

from .estimators import CGE, RGE
from .precision import full_precision
from .queries import QueryCounter
from .zo_core import Directions, check_resolution, difference


class ZOFunction:
    """A black box `fn` wrapped for autograd (build it with `zo_function`); call it like `fn`.

    `f(x, *args, step=None)`: `args` are passed to every query unchanged and get no gradient (a
    label, a time step). `step` seeds RGE's directions; by default it is the number of earlier
    calls, which `state_dict` saves so that a resumed run replays the same directions.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        estimator: CGE | RGE | None = None,
        *,
        per_sample: bool = False,
        chunk: int = 1,
        numpy: bool = False,
        counter: QueryCounter | None = None,
    ):
        estimator = CGE() if estimator is None else estimator
        if not isinstance(estimator, CGE | RGE):
            raise TypeError(f"zo_function estimates with CGE or RGE, got {type(estimator).__name__}")
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.fn, self.estimator, self.per_sample = fn, estimator, per_sample
        self.chunk, self.numpy = int(chunk), numpy
        self.counter = counter if counter is not None else QueryCounter()
        self.calls = 0

    def __call__(self, x: Tensor, *args: Any, step: int | None = None) -> Tensor:
        step = self.calls if step is None else int(step)
        self.calls += 1
        return _BlackBoxVJP.apply(x, self, step, args)

    def queries_per_call(self, dim: int) -> int:
        """Queries of one forward and backward for an input of `dim` coordinates (per sample)."""
        est = self.estimator
        n = dim if isinstance(est, CGE) else (est.q or dim)
        return (2 * n if est.scheme == "central" else n) + 1

    def state_dict(self) -> dict[str, int]:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.calls = int(state["calls"])

    # ---- queries -------------------------------------------------------------------------------
    def query(self, x: Tensor, args: Sequence[Any], count: int = 1) -> Tensor:
        """fn at `x`, which holds `count` inputs (one: a batch when per_sample), each counted as a
        query; a tensor on x's device and dtype."""
        self.counter.add(count, float(count))
        out = self.fn(x.detach().cpu().numpy() if self.numpy else x.detach(), *args)
        out = torch.as_tensor(out, device=x.device)
        return out.to(x.dtype) if out.is_floating_point() else out

    def query_many(self, points: list[Tensor], like: Tensor, args: Sequence[Any]) -> list[Tensor]:
        """fn at every point, `chunk` points per call: concatenated along the batch when per_sample,
        else stacked along a new leading dimension (fn must accept it)."""
        if self.chunk == 1:
            return [self._checked(self.query(p, args), like) for p in points]
        outs: list[Tensor] = []
        for start in range(0, len(points), self.chunk):
            group = points[start : start + self.chunk]
            stacked = torch.cat(group) if self.per_sample else torch.stack(group)
            out = self.query(stacked, args, count=len(group))
            outs += self._checked(out, like, len(group)).unbind(0)
        return outs

    def _checked(self, out: Tensor, like: Tensor, k: int | None = None) -> Tensor:
        want = like.shape if k is None else (k, *like.shape)
        if k is not None and out.numel() == k * like.numel():
            out = out.reshape(want)
        if out.shape != want:
            raise RunError(
                f"black box returned shape {tuple(out.shape)} at a perturbed input, expected {tuple(want)}"
            )
        return out

    # ---- the vector-Jacobian product --------------------------------------------------------
    def vjp(self, x: Tensor, y: Tensor, v: Tensor, step: int, args: Sequence[Any]) -> Tensor:
        """ZO estimate of grad_x <v, fn(x)> (per sample: row b of x only moves <v_b, fn(x)_b>)."""
        est = self.estimator
        check_resolution(est.mu, [("the black box's input", x)])
        rows = x.shape[0] if self.per_sample else 1
        flat = x.detach().reshape(rows, -1)
        d = flat.shape[1]

        def coefs(point: Callable[[int, float], Tensor], n: int) -> Tensor:
            """Directional derivatives of <v, fn> along points 0..n-1 (float64, shape (n, rows))."""
            out = torch.empty(n, rows, dtype=torch.float64, device=x.device)
            for start in range(0, n, self.chunk):
                todo = range(start, min(n, start + self.chunk))
                plus = self.query_many([point(i, est.mu) for i in todo], y, args)
                low: list[Tensor] = [y] * len(todo)
                if est.scheme == "central":
                    low = self.query_many([point(i, -est.mu) for i in todo], y, args)
                for i, p, lo in zip(todo, plus, low):
                    change = difference(p, lo, est.mu, est.scheme)
                    out[i] = (v.to(torch.float64) * change.to(torch.float64)).reshape(rows, -1).sum(1)
            return out

        if isinstance(est, CGE):

            def moved(j: int, by: float) -> Tensor:
                p = flat.clone()
                p[:, j] += by
                return p.view_as(x)

            grad = coefs(moved, d).t()
        else:
            dirs = Directions(
                est.q or d, (rows, d), distribution=est.distribution, seed=est.seed, step=step,
                dtype=x.dtype, device=x.device, per_sample=True, keep=not est.seed_replay,
            )  # fmt: skip
            grad = dirs.combine(coefs(lambda i, by: (flat + by * dirs[i]).view_as(x), len(dirs)))
        return grad.view_as(x).to(x.dtype)


class _BlackBoxVJP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, box: ZOFunction, step: int, args: tuple) -> Tensor:  # type: ignore[override]
        with full_precision():  # differences of what fn computes, not of rounding (backward too)
            y = box.query(x, args)
        ctx.box, ctx.step, ctx.args = box, step, args
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, v: Tensor) -> tuple[Tensor | None, None, None, None]:  # type: ignore[override]
        x, y = ctx.saved_tensors
        with full_precision():
            grad = ctx.box.vjp(x, y, v, ctx.step, ctx.args) if ctx.needs_input_grad[0] else None
        return grad, None, None, None


def zo_function(
    fn: Callable[..., Any],
    estimator: CGE | RGE | None = None,
    *,
    per_sample: bool = False,
    chunk: int = 1,
    numpy: bool = False,
    counter: QueryCounter | None = None,
) -> ZOFunction:
    """Wrap the black box `fn` (x, *args) -> y as a differentiable torch function.

    estimator: `CGE(mu, scheme)` (default; one query per input coordinate, or two when central) or
        `RGE(q, mu, distribution, scheme, seed, seed_replay)` (q directions in input space); their
        `evaluator` is not used.
    per_sample: fn maps a batch (dim 0) sample by sample; then a query moves every sample's
        coordinate (or direction) at once, so CGE costs d + 1 calls for d coordinates per sample,
        whatever the batch size.
    chunk: perturbed inputs per call of fn (concatenated along the batch when per_sample, else
        stacked along a new leading dimension).
    numpy: fn takes numpy arrays (on the CPU); its outputs may be numpy or tensors, and come back
        on x's device in x's floating dtype.
    counter: the QueryCounter every evaluation of fn at one input is added to (default: its own,
        `f.counter`).
    """
    return ZOFunction(fn, estimator, per_sample=per_sample, chunk=chunk, numpy=numpy, counter=counter)
