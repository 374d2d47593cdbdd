"""The one zeroth-order core: finite differences, random directions and their scaling.

Every ZO gradient in the package is assembled here, whatever is perturbed: `CGE` and `RGE` over
model parameters (and ZO-GraSP, which calls `RGE`), and `zo_function` over a black box's input.
They differ only in which points they query and how the queries run (evaluators, batching).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Literal

import torch

from ..errors import ConfigError

Scheme = Literal["forward", "central"]
Distribution = Literal["gaussian", "sphere"]


def check_mu(mu: float) -> float:
    if not mu > 0:
        raise ValueError(f"mu must be > 0, got {mu}")
    return float(mu)


def check_scheme(scheme: str) -> str:
    if scheme not in ("forward", "central"):
        raise ValueError(f"unknown difference scheme '{scheme}'; choose forward or central")
    return scheme


def check_distribution(distribution: str) -> str:
    if distribution not in ("gaussian", "sphere"):
        raise ValueError(f"unknown RGE distribution '{distribution}'; choose gaussian or sphere")
    return distribution


RESOLUTION = 5  # float spacings of the largest value moved that mu must span: rounding <= 10 % of mu


def check_resolution(mu: float, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """One-line error when a step of mu is too fine for a 16-bit float tensor it moves: v + mu is
    rounded to v's float spacing (up to eps * |v|), so below RESOLUTION spacings the difference quotient
    measures rounding instead of the function (bfloat16 at the default mu = 5e-3: a gradient cosine of
    0.82 on a small MLP; float16 or bfloat16 at mu = 1e-4: most coordinates exactly zero). float32 and
    float64 pass: there only a diverged run (weights ~1e30) or an absurd mu gets that far, and the
    trainer's non-finite check names those. For RGE, where a coordinate moves by mu * u_i, this is the
    necessary condition on the step's scale."""
    for name, t in tensors:
        if t.dtype not in (torch.float16, torch.bfloat16) or t.numel() == 0:
            continue
        eps, largest = torch.finfo(t.dtype).eps, float(t.detach().abs().max())
        if mu < RESOLUTION * eps * largest:
            dtype = str(t.dtype).removeprefix("torch.")
            raise ConfigError(
                f"mu={mu:g} is too fine for {name} ({dtype}, largest |value| {largest:.3g}): rounding moves "
                f"the step by up to {50 * eps * largest / mu:.0f} % of mu; use mu >= "
                f"{RESOLUTION * eps * largest:.2g}, or float32/float64 parameters"
            )


def difference(plus: torch.Tensor, low: torch.Tensor | float, mu: float, scheme: str) -> torch.Tensor:
    """Directional derivatives from losses along +u and the low point: f(x) for the forward scheme,
    f(x - mu u) for the central one: (f(x + mu u) - f(x)) / mu or (f(x + mu u) - f(x - mu u)) / 2 mu."""
    return (plus - low) / (2 * mu if scheme == "central" else mu)


def direction_seed(seed: int, step: int, i: int) -> int:
    """The generator seed of direction i at step `step`: a resumed run or another rank replays it."""
    return (seed * 1_000_003 + step) * 65_537 + i


class Directions(Sequence[torch.Tensor]):
    """The q random directions of one step, each a pure function of (seed, step, i).

    gaussian: u ~ N(0, I), phi = 1; sphere: u uniform on the unit sphere, phi = d (the size of one
    direction), so that phi E[u u^T] = I. per_sample=True draws one direction per row of `shape`
    (dim 0 is the batch; each row normalized on its own). keep=False stores nothing and regenerates
    a direction whenever it is needed again (seed replay, MeZO-style memory).
    """

    def __init__(
        self,
        q: int,
        shape: Sequence[int],
        *,
        distribution: str = "gaussian",
        seed: int = 0,
        step: int = 0,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
        per_sample: bool = False,
        keep: bool = True,
    ):
        if q < 1:
            raise ValueError(f"q must be >= 1, got {q}")
        self.q, self.shape, self.distribution = int(q), tuple(shape), check_distribution(distribution)
        self.seed, self.step, self.dtype, self.device = int(seed), int(step), dtype, torch.device(device)
        self.per_sample, self.keep = per_sample, keep
        self._stored: dict[int, torch.Tensor] = {}

    @property
    def dim(self) -> int:
        """d: the number of coordinates one direction spans (per sample when per_sample)."""
        n = 1
        for s in self.shape[1:] if self.per_sample else self.shape:
            n *= s
        return n

    @property
    def phi(self) -> float:
        return float(self.dim) if self.distribution == "sphere" else 1.0

    def __len__(self) -> int:
        return self.q

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        if not 0 <= i < self.q:
            raise IndexError(f"direction {i} of {self.q}")
        if i in self._stored:
            return self._stored[i]
        g = torch.Generator(device=self.device).manual_seed(direction_seed(self.seed, self.step, i))
        u = torch.randn(self.shape, generator=g, dtype=self.dtype, device=self.device)
        if self.distribution == "sphere":
            u = u / (u.flatten(1).norm(dim=1).view(-1, *[1] * (u.dim() - 1)) if self.per_sample else u.norm())
        if self.keep:
            self._stored[i] = u
        return u

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(self.q))

    def combine(self, coefs: torch.Tensor) -> torch.Tensor:
        """(phi / q) sum_i coefs[i] u_i in float64; coefs has shape (q,), or (q, batch) per sample."""
        grad = torch.zeros(self.shape, dtype=torch.float64, device=self.device)
        for i, c in enumerate(coefs):
            u = self[i].to(torch.float64)
            if c.dim() == 0:
                grad.add_(u, alpha=float(c))
            else:
                grad.addcmul_(c.to(grad.device).view(-1, *[1] * (u.dim() - 1)), u)
        return grad.mul_(self.phi / self.q)
