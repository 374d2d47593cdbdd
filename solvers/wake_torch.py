"""Differentiable torch twin of :class:`~deepzero_apps.solvers.wake.WakeSolver` (FO-SOL on ``wake``).

The same discretisation, operation for operation, as the numpy solver's batched step
(:meth:`WakeSolver.step_batch`): boundaries, semi-Lagrangian advection of the staggered components with
edge-clamped bilinear interpolation, explicit diffusion sub-stepped per state, optional body force and
the pressure projection. The geometry (fixed faces, pressure matrix) comes from
:class:`~.cylinder.StaggeredGeometry`, which the numpy solver builds too; this module never imports it.
The one difference is the pressure solve: a dense LU here (``torch.linalg.lu_solve``, differentiable in
its right-hand side) where the numpy solver uses a sparse LU, so rollouts agree to float64 rounding
(tests/test_solvers.py). A dense matrix is meant for source grids: at most ``MAX_CELLS`` cells.

Gradients flow into the state (through the interpolated values and, via the interpolation weights,
through the backtrace velocities), the body force and the pressure solve; not into the Reynolds number
of the sub-step count (an integer).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import Grid, Solver, require
from .cylinder import StaggeredGeometry, viscosity

__all__ = ["WakeTorch"]

MAX_CELLS = 16384  # a dense (cells x cells) float64 pressure matrix: 2 GiB at this size


class WakeTorch(nn.Module):
    """Batched torch wake step: ``forward(state (B, 2, ny, nx), re (B,) or None, forcing=None)``."""

    def __init__(
        self, grid: Grid, dt: float, re: float, inflow: float, center: tuple[float, float], radius: float
    ) -> None:
        super().__init__()
        ny, nx = grid.shape
        require(ny * nx <= MAX_CELLS, f"the wake's torch twin solves pressure densely: {ny}x{nx} cells > {MAX_CELLS}")
        self.grid, self.dt, self.re, self.inflow, self.radius = grid, float(dt), float(re), float(inflow), float(radius)
        geometry = StaggeredGeometry(grid, center, radius)
        lu, pivots = torch.linalg.lu_factor(torch.from_numpy(geometry.matrix.toarray()))
        self.register_buffer("lu", lu, persistent=False)
        self.register_buffer("pivots", pivots, persistent=False)
        self.register_buffer("solid", torch.from_numpy(geometry.solid), persistent=False)
        self.register_buffer("fixed", torch.from_numpy(geometry.fixed), persistent=False)
        self.register_buffer("open", torch.from_numpy(geometry.open), persistent=False)
        dy, dx = grid.spacing
        jj, ii = torch.meshgrid(
            torch.arange(ny, dtype=torch.float64), torch.arange(nx, dtype=torch.float64), indexing="ij"
        )
        self.register_buffer("u_pos", torch.stack([(jj + 0.5) * dy, (ii + 1.0) * dx]), persistent=False)
        self.register_buffer("v_pos", torch.stack([(jj + 1.0) * dy, (ii + 0.5) * dx]), persistent=False)

    @classmethod
    def from_solver(cls, solver: Solver) -> WakeTorch:
        """The twin of a :class:`~deepzero_apps.solvers.wake.WakeSolver` (same grid and parameters)."""
        return cls(solver.grid, solver.dt, solver.re, solver.inflow, solver.center, solver.radius)

    # -- face arrays, as in the numpy solver ---------------------------------------------------------
    def _full_u(self, u: Tensor) -> Tensor:
        return torch.cat([torch.full_like(u[..., :1], self.inflow), u], dim=-1)

    @staticmethod
    def _full_v(v: Tensor) -> Tensor:
        return torch.cat([torch.zeros_like(v[..., :1, :]), v], dim=-2)

    @staticmethod
    def _interpolate(field: Tensor, cy: Tensor, cx: Tensor) -> Tensor:
        """Edge-clamped bilinear samples of ``field (B, h, w)`` at fractional indices ``(B, ny, nx)``."""
        b, h, w = field.shape
        cy, cx = cy.clamp(0.0, h - 1.0), cx.clamp(0.0, w - 1.0)
        y0, x0 = torch.clamp(torch.floor(cy), max=h - 2.0), torch.clamp(torch.floor(cx), max=w - 2.0)
        ty, tx = cy - y0, cx - x0
        i00 = (torch.arange(b, device=field.device)[:, None, None] * h + y0.long()) * w + x0.long()
        flat = field.reshape(-1)
        f00, f01, f10, f11 = (flat[i00 + k] for k in (0, 1, w, w + 1))
        return (1.0 - ty) * ((1.0 - tx) * f00 + tx * f01) + ty * ((1.0 - tx) * f10 + tx * f11)

    def _sample_u(self, uf: Tensor, y: Tensor, x: Tensor) -> Tensor:
        dy, dx = self.grid.spacing
        shape = uf[..., :-1].shape
        return self._interpolate(uf, y.expand(shape) / dy - 0.5, x.expand(shape) / dx)

    def _sample_v(self, vf: Tensor, y: Tensor, x: Tensor) -> Tensor:
        dy, dx = self.grid.spacing
        vg = torch.cat([-vf[..., :, :1], vf], dim=-1)  # ghost column: v = 0 on the inflow boundary
        shape = vf[..., :-1, :].shape
        return self._interpolate(vg, y.expand(shape) / dy, x.expand(shape) / dx + 0.5)

    def apply_boundaries(self, state: Tensor) -> Tensor:
        return state.masked_fill(self.fixed, 0.0)

    def advect(self, state: Tensor) -> Tensor:
        u, v = state[:, 0], state[:, 1]
        uf, vf = self._full_u(u), self._full_v(v)
        (yu, xu), (yv, xv) = self.u_pos.to(state.dtype), self.v_pos.to(state.dtype)
        v_at_u = self._sample_v(vf, yu, xu)
        u_new = self._sample_u(uf, yu - self.dt * v_at_u, xu - self.dt * u)
        u_at_v = self._sample_u(uf, yv, xv)
        v_new = self._sample_v(vf, yv - self.dt * v, xv - self.dt * u_at_v)
        return torch.stack([u_new, v_new], dim=-3)

    def diffuse(self, state: Tensor, nu: Tensor) -> Tensor:
        """Explicit diffusion, one viscosity per state, each with its own number of sub-steps."""
        dy, dx = self.grid.spacing
        nu = nu.reshape(-1, 1, 1)
        n_sub = torch.clamp(torch.ceil(self.dt * nu * (2.0 / dx**2 + 2.0 / dy**2) / 0.9), min=1)
        h = self.dt * nu / n_sub
        u, v = state[:, 0], state[:, 1]
        for i in range(int(n_sub.max())):
            # u: inflow value on the left, zero-gradient right (outflow) and top/bottom (free slip).
            up = self._full_u(u)
            up = torch.cat([up, up[..., -1:]], dim=-1)
            up = torch.cat([up[..., :1, :], up, up[..., -1:, :]], dim=-2)
            lap_u = (up[..., 1:-1, :-2] - 2 * up[..., 1:-1, 1:-1] + up[..., 1:-1, 2:]) / dx**2 + (
                up[..., :-2, 1:-1] - 2 * up[..., 1:-1, 1:-1] + up[..., 2:, 1:-1]
            ) / dy**2
            # v: walls (0) at bottom/top, v = 0 at the inflow (odd ghost), zero-gradient outflow.
            vf = torch.cat([torch.zeros_like(v[..., :1, :]), v[..., :-1, :], torch.zeros_like(v[..., :1, :])], dim=-2)
            vp = torch.cat([-vf[..., :, :1], vf, vf[..., :, -1:]], dim=-1)
            lap_v = (vp[..., 1:-1, :-2] - 2 * vp[..., 1:-1, 1:-1] + vp[..., 1:-1, 2:]) / dx**2 + (
                vp[..., :-2, 1:-1] - 2 * vp[..., 1:-1, 1:-1] + vp[..., 2:, 1:-1]
            ) / dy**2
            active = i < n_sub  # states with fewer sub-steps keep their value
            u = torch.where(active, u + h * lap_u, u).masked_fill(self.fixed[0], 0.0)
            v_in = torch.where(active, v[..., :-1, :] + h * lap_v, v[..., :-1, :])
            v = torch.cat([v_in, v[..., -1:, :]], dim=-2).masked_fill(self.fixed[1], 0.0)
        return torch.stack([u, v], dim=-3)

    def project(self, state: Tensor) -> Tensor:
        """Pressure projection onto discretely divergence-free fields (boundaries applied first)."""
        out = self.apply_boundaries(state)
        (ny, nx), (dy, dx) = self.grid.shape, self.grid.spacing
        uf, vf = self._full_u(out[:, 0]), self._full_v(out[:, 1])
        div = (uf[..., :, 1:] - uf[..., :, :-1]) / dx + (vf[..., 1:, :] - vf[..., :-1, :]) / dy
        div = div.masked_fill(self.solid, 0.0)
        rhs = div.reshape(-1, ny * nx).T  # (cells, states): one multi-right-hand-side solve
        p = torch.linalg.lu_solve(self.lu, self.pivots, rhs).T.reshape(div.shape)
        grad_x = torch.cat([(p[..., :, 1:] - p[..., :, :-1]) / dx, (0.0 - p[..., :, -1:]) / dx], dim=-1)
        grad_y = torch.cat([(p[..., 1:, :] - p[..., :-1, :]) / dy, torch.zeros_like(p[..., :1, :])], dim=-2)
        zero = torch.zeros((), dtype=out.dtype, device=out.device)
        return torch.stack(
            [out[:, 0] - torch.where(self.open[0], grad_x, zero), out[:, 1] - torch.where(self.open[1], grad_y, zero)],
            dim=-3,
        )

    def forward(self, state: Tensor, re: Tensor | None = None, forcing: Tensor | None = None, **_: Any) -> Tensor:
        if state.dim() != 4 or tuple(state.shape[1:]) != (2, *self.grid.shape):
            raise ValueError(f"expected state of shape (B, 2, {self.grid.ny}, {self.grid.nx}), got {tuple(state.shape)}")
        re = torch.full((state.shape[0],), self.re, dtype=state.dtype) if re is None else re
        nu = viscosity(self.inflow, self.radius, torch.as_tensor(re, dtype=state.dtype).reshape(-1).expand(state.shape[0]))
        new = self.diffuse(self.advect(self.apply_boundaries(state)), nu)
        if forcing is not None:
            new = new + self.dt * torch.as_tensor(forcing, dtype=new.dtype, device=new.device)
        return self.project(new)
