"""Differentiable torch twin of :class:`~deepzero_apps.solvers.burgers.BurgersSolver`.

Used for the first-order "FO-SOL" upper bound: the correction network is trained by
backpropagating through the unrolled solver. The discretisation is identical to the numpy solver:
semi-Lagrangian advection with periodic bilinear interpolation (same arithmetic), ``+ dt * f``, and
implicit diffusion. The periodic 5-point Laplacian is diagonalised by the DFT, so
``(I - dt nu L)^{-1}`` is applied exactly as a division of the FFT coefficients by
``1 + dt nu lam(ky, kx)``; in float64 one step matches the sparse-LU numpy step to ~1e-13.

Gradients flow into the state (through the interpolated values and, via the interpolation weights,
through the backtrace velocity) and into the forcing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .base import Solver
from .burgers_setup import burgers_grid

__all__ = ["BurgersTorch", "periodic_bilinear_torch"]


def periodic_bilinear_torch(field: Tensor, py: Tensor, px: Tensor) -> Tensor:
    """Periodic bilinear interpolation of ``field[B, C, H, W]`` at fractional indices ``py, px``
    of shape ``(B, H, W)``; returns ``(B, C, H, W)``."""
    b, c, h, w = field.shape
    y0 = torch.floor(py)
    x0 = torch.floor(px)
    fy = (py - y0).unsqueeze(1)
    fx = (px - x0).unsqueeze(1)
    iy0 = torch.remainder(y0.long(), h)
    ix0 = torch.remainder(x0.long(), w)
    iy1 = torch.remainder(iy0 + 1, h)
    ix1 = torch.remainder(ix0 + 1, w)
    flat = field.reshape(b, c, h * w)

    def gather(iy: Tensor, ix: Tensor) -> Tensor:
        idx = (iy * w + ix).reshape(b, 1, h * w).expand(b, c, h * w)
        return torch.gather(flat, 2, idx).reshape(b, c, h, w)

    f00, f01, f10, f11 = gather(iy0, ix0), gather(iy0, ix1), gather(iy1, ix0), gather(iy1, ix1)
    return (1.0 - fy) * ((1.0 - fx) * f00 + fx * f01) + fy * ((1.0 - fx) * f10 + fx * f11)


class BurgersTorch(nn.Module):
    """Batched torch Burgers step; same constructor arguments as :class:`BurgersSolver`.

    ``step_torch(state[B, 2, H, W], forcing=None, nu=None)`` (also ``forward``) returns the next state.
    ``forcing`` may be ``(2, H, W)`` or ``(B, 2, H, W)``; ``nu`` (the condition) one viscosity or ``(B,)``.
    """

    def __init__(
        self,
        resolution: int | str | Sequence[int] = "source",
        size: float = 32.0,
        nu: float = 0.1,
        dt: float = 0.1,
        advection: bool = True,
        diffusion: bool = True,
        **_unused,
    ) -> None:
        super().__init__()
        self.grid = burgers_grid(resolution, size, nu, dt, diffusion=False)  # nu = 0 switches diffusion off here
        self.channels = ("u", "v")
        self.dt = float(dt)
        self.nu = float(nu)
        self.advection = bool(advection)
        self.diffusion = bool(diffusion) and self.nu > 0
        ny, nx = self.grid.shape
        dy, dx = self.grid.spacing
        my = torch.arange(ny, dtype=torch.float64)
        mx = torch.arange(nx // 2 + 1, dtype=torch.float64)
        lam_y = 4.0 * torch.sin(math.pi * my / ny) ** 2 / dy**2
        lam_x = 4.0 * torch.sin(math.pi * mx / nx) ** 2 / dx**2
        self.register_buffer("lam", lam_y[:, None] + lam_x[None, :], persistent=False)
        jj, ii = torch.meshgrid(
            torch.arange(ny, dtype=torch.float64), torch.arange(nx, dtype=torch.float64), indexing="ij"
        )
        self.register_buffer("jj", jj, persistent=False)
        self.register_buffer("ii", ii, persistent=False)

    @classmethod
    def from_solver(cls, solver: Solver) -> BurgersTorch:
        """The twin of a :class:`~deepzero_apps.solvers.burgers.BurgersSolver` (same grid and parameters)."""
        return cls(
            resolution=solver.grid.shape,
            size=solver.grid.size[1],
            nu=solver.nu,
            dt=solver.dt,
            advection=solver.advection,
            diffusion=solver.diffusion,
        )

    def advect(self, state: Tensor) -> Tensor:
        dy, dx = self.grid.spacing
        jj = self.jj.to(state.dtype)
        ii = self.ii.to(state.dtype)
        py = jj - (self.dt / dy) * state[:, 1]
        px = ii - (self.dt / dx) * state[:, 0]
        return periodic_bilinear_torch(state, py, px)

    def diffuse(self, state: Tensor, nu: Tensor | float | None = None) -> Tensor:
        """Implicit diffusion with one viscosity or one per state (``nu`` of shape ``(B,)``)."""
        if not self.diffusion:
            return state
        h, w = state.shape[-2:]
        nu = torch.as_tensor(self.nu if nu is None else nu, dtype=state.dtype, device=state.device)
        inv_denom = 1.0 / (1.0 + self.dt * nu.reshape(-1, 1, 1, 1) * self.lam.to(state.dtype))
        return torch.fft.irfft2(torch.fft.rfft2(state) * inv_denom, s=(h, w))

    def step_torch(self, state: Tensor, forcing: Tensor | None = None, nu: Tensor | float | None = None) -> Tensor:
        if state.dim() != 4 or tuple(state.shape[1:]) != (2, *self.grid.shape):
            raise ValueError(
                f"expected state of shape (B, 2, {self.grid.ny}, {self.grid.nx}), got {tuple(state.shape)}"
            )
        new = self.advect(state) if self.advection else state
        if forcing is not None:
            new = new + self.dt * torch.as_tensor(forcing, dtype=new.dtype, device=new.device)
        return self.diffuse(new, nu)

    def forward(self, state: Tensor, forcing: Tensor | None = None, nu: Tensor | float | None = None) -> Tensor:
        return self.step_torch(state, forcing, nu)
