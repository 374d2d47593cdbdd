"""2D unsteady incompressible wake flow behind a cylinder (Solver-in-the-Loop's wake setup).

    du/dt + (u . grad) u = -grad p + nu lap(u),   div u = 0,   nu = U_in * 2 R / Re

Setup (defaults): domain ``200 x 100`` (``Lx x Ly``), cylinder of radius 10 centred at (50, 50),
inflow ``u = 1, v = 0`` at the left, outflow at the right (zero-gradient velocity, ``p = 0``),
free-slip walls at the bottom and top. *Reference* grid 256x128 (``nx x ny``, spacing 0.78125),
*source* grid 64x32 (spacing 3.125); ``dt = 1``. The Reynolds number is a condition (``re``, drawn
per simulation by the app, log-uniformly in 100-1000 by default), and each seed draws a small random
perturbation of the uniform initial flow that breaks the symmetry, so vortex shedding (a Karman street) develops after a transient.

Staggered (MAC) layout in a ``(2, ny, nx)`` state (``grid.staggered = True``):

* ``state[0, j, i]`` is ``u`` on the *right* face of cell ``(j, i)``, at ``x = (i + 1) dx``,
  ``y = (j + 1/2) dy``; the last column is the outflow face, the inflow face ``x = 0`` is not stored
  (it is always ``u_in``);
* ``state[1, j, i]`` is ``v`` on the *top* face of cell ``(j, i)``, at ``x = (i + 1/2) dx``,
  ``y = (j + 1) dy``; the last row is the top wall (always 0), the bottom wall is not stored.

One step: (1) semi-Lagrangian advection of both components (first-order backtrace, bilinear
interpolation, boundary values by extrapolation); (2) explicit diffusion, sub-stepped when
``dt nu (2/dx^2 + 2/dy^2) > 0.9``; (3) optional body force ``dt * forcing``; (4) faces touching the
obstacle and the top wall are set to zero; (5) pressure projection: ``L_w p = div u`` with the
5-point Laplacian restricted to the open faces (Dirichlet ``p = 0`` beyond the outflow), a sparse
matrix that depends only on the geometry and is LU-factorised once per solver. The projected state
satisfies the discrete divergence (:meth:`WakeSolver.divergence`) to round-off.

:meth:`WakeSolver.downsample` averages face *fluxes* (a fine divergence-free state restricts to a
coarse divergence-free one) and :meth:`WakeSolver.upsample` interpolates each component linearly
along its own axis (a coarse divergence-free state prolongs to a fine divergence-free one).
"""

from __future__ import annotations

from functools import cache
from typing import Any, NamedTuple

import numpy as np
from scipy.ndimage import map_coordinates
from scipy.sparse.linalg import factorized
from threadpoolctl import ThreadpoolController

from .base import Grid, Solver, _ratio, _target_shape
from .burgers import smooth_random_field
from .cylinder import CylinderFlow, StaggeredGeometry

__all__ = ["WakeSolver"]


@cache
def _blas() -> ThreadpoolController:
    return ThreadpoolController()


def _blas_threads(n: int) -> Any:
    """Context manager limiting BLAS (OpenBLAS/MKL) to `n` threads."""
    return _blas().limit(limits=n, user_api="blas")


PRESETS: dict[str, tuple[int, int]] = {"reference": (128, 256), "source": (32, 64)}


class WakeSolver(CylinderFlow):
    """Incompressible flow past a cylinder on a staggered grid, in numpy/scipy; channels ``("u", "v")``.

    Parameters as :class:`CylinderFlow`'s; ``"reference"`` is 256x128, ``"source"`` 64x32, and
    ``radius = 0`` removes the cylinder.
    """

    name = "wake"
    presets = PRESETS
    staggered = True
    batch_native = property(lambda self: self.native_batch(WakeSolver))

    def _setup(self) -> None:
        """The geometry's fixed faces, the LU-factorised pressure matrix and the face positions."""
        ny, nx = self.grid.shape
        dy, dx = self.grid.spacing
        geometry = StaggeredGeometry(self.grid, self.center, self.radius)
        self.solid, self.fixed, self.open = geometry.solid, geometry.fixed, geometry.open
        self._solve = factorized(geometry.matrix.tocsc())

        # Face positions (physical) of the stored components.
        jj, ii = np.meshgrid(np.arange(ny, dtype=np.float64), np.arange(nx, dtype=np.float64), indexing="ij")
        self._u_pos = ((jj + 0.5) * dy, (ii + 1.0) * dx)
        self._v_pos = ((jj + 1.0) * dy, (ii + 0.5) * dx)
        # Fractional indices of the fixed samples (v at the u faces in the ghosted v array, u at the v
        # faces), with their bilinear stencils for batches.
        (yu, xu), (yv, xv) = self._u_pos, self._v_pos
        self._v_at_u = _FixedPoints(yu / dy, xu / dx + 0.5, (ny + 1, nx + 1))
        self._u_at_v = _FixedPoints(yv / dy - 0.5, xv / dx, (ny, nx + 1))

    def torch_twin(self):
        """The differentiable torch version of this solver (:class:`.wake_torch.WakeTorch`)."""
        from .wake_torch import WakeTorch

        return WakeTorch.from_solver(self)

    # -- full face arrays ----------------------------------------------------------------------------
    # Every array method below takes states ``(..., 2, ny, nx)``: one state or a batch (`step_batch`).
    def _full_u(self, u: np.ndarray) -> np.ndarray:
        """``(..., ny, nx + 1)``: inflow face, then the stored faces."""
        return np.concatenate([np.full((*u.shape[:-1], 1), self.inflow), u], axis=-1)

    def _full_v(self, v: np.ndarray) -> np.ndarray:
        """``(..., ny + 1, nx)``: bottom wall, then the stored faces."""
        return np.concatenate([np.zeros((*v.shape[:-2], 1, v.shape[-1])), v], axis=-2)

    def divergence(self, state: np.ndarray) -> np.ndarray:
        """Discrete divergence per cell, ``(..., ny, nx)``."""
        dy, dx = self.grid.spacing
        state = np.asarray(state, dtype=np.float64)
        uf = self._full_u(state[..., 0, :, :])
        vf = self._full_v(state[..., 1, :, :])
        return (uf[..., :, 1:] - uf[..., :, :-1]) / dx + (vf[..., 1:, :] - vf[..., :-1, :]) / dy

    def apply_boundaries(self, state: np.ndarray) -> np.ndarray:
        """Zero the faces touching the obstacle and the top wall (returns a new array)."""
        out = np.array(state, dtype=np.float64, copy=True)
        np.copyto(out, 0.0, where=self.fixed)
        return out

    def project(self, state: np.ndarray) -> np.ndarray:
        """Pressure projection onto discretely divergence-free fields (boundaries applied first)."""
        out = self.apply_boundaries(state)
        ny, nx = self.grid.shape
        dy, dx = self.grid.spacing
        div = self.divergence(out)
        div[..., self.solid] = 0.0
        rhs = div.reshape(-1, ny * nx).T  # (cells, states): one multi-right-hand-side solve
        with _blas_threads(1):  # tiny triangular solves: BLAS threads only spin (10-80x slower under load)
            p = np.asarray(self._solve(np.asfortranarray(rhs))).T.reshape(div.shape)
        grad_x = np.empty(p.shape)
        grad_x[..., :, :-1] = (p[..., :, 1:] - p[..., :, :-1]) / dx
        grad_x[..., :, -1] = (0.0 - p[..., :, -1]) / dx
        grad_y = np.zeros(p.shape)
        grad_y[..., :-1, :] = (p[..., 1:, :] - p[..., :-1, :]) / dy
        out[..., 0, :, :] -= np.where(self.open[0], grad_x, 0.0)
        out[..., 1, :, :] -= np.where(self.open[1], grad_y, 0.0)
        return out

    # -- advection ------------------------------------------------------------------------------
    def _ghost_v(self, vf: np.ndarray) -> np.ndarray:
        """``(..., ny + 1, nx + 1)``: a ghost column at ``x = -dx/2`` holding ``-v`` (``v = 0`` on the
        inflow boundary), then the full v faces."""
        return np.concatenate([-vf[..., :, :1], vf], axis=-1)

    def advect(self, state: np.ndarray) -> np.ndarray:
        u, v = state[..., 0, :, :], state[..., 1, :, :]
        uf, vg = self._full_u(u), self._ghost_v(self._full_v(v))
        (yu, xu), (yv, xv) = self._u_pos, self._v_pos
        dy, dx, dt = *self.grid.spacing, self.dt
        v_at_u = self._v_at_u.sample(vg)
        u_new = _sample(uf, (yu - dt * v_at_u) / dy - 0.5, (xu - dt * u) / dx)
        u_at_v = self._u_at_v.sample(uf)
        v_new = _sample(vg, (yv - dt * v) / dy, (xv - dt * u_at_v) / dx + 0.5)
        return np.stack([u_new, v_new], axis=-3)

    def diffuse(self, state: np.ndarray, nu: float | np.ndarray) -> np.ndarray:
        """Explicit diffusion; ``nu`` is one viscosity or one per state (each with its own sub-steps)."""
        dy, dx = self.grid.spacing
        nu = np.asarray(nu, dtype=np.float64)
        nu = nu.reshape(-1, 1, 1) if nu.ndim else nu
        rate = self.dt * nu * (2.0 / dx**2 + 2.0 / dy**2)
        n_sub = np.maximum(1, np.ceil(rate / 0.9))
        h = self.dt * nu / n_sub
        u, v = state[..., 0, :, :].copy(), state[..., 1, :, :].copy()
        lead = [(0, 0)] * (u.ndim - 2)
        for i in range(int(n_sub.max())):
            # u: inflow value on the left, zero-gradient right (outflow) and top/bottom (free slip).
            up = np.pad(self._full_u(u), [*lead, (1, 1), (0, 1)], mode="edge")
            lap_u = (up[..., 1:-1, :-2] - 2 * up[..., 1:-1, 1:-1] + up[..., 1:-1, 2:]) / dx**2 + (
                up[..., :-2, 1:-1] - 2 * up[..., 1:-1, 1:-1] + up[..., 2:, 1:-1]
            ) / dy**2
            # v: walls (0) at bottom/top, v = 0 at the inflow (odd ghost), zero-gradient outflow.
            vf = self._full_v(v)
            vf[..., -1, :] = 0.0
            vp = np.concatenate([-vf[..., :, :1], vf, vf[..., :, -1:]], axis=-1)
            lap_v = (vp[..., 1:-1, :-2] - 2 * vp[..., 1:-1, 1:-1] + vp[..., 1:-1, 2:]) / dx**2 + (
                vp[..., :-2, 1:-1] - 2 * vp[..., 1:-1, 1:-1] + vp[..., 2:, 1:-1]
            ) / dy**2
            active = i < n_sub  # states with fewer sub-steps keep their value
            if np.all(active):
                u = u + h * lap_u
                v[..., :-1, :] += h * lap_v
            else:
                u = np.where(active, u + h * lap_u, u)
                v[..., :-1, :] = np.where(active, v[..., :-1, :] + h * lap_v, v[..., :-1, :])
            np.copyto(u, 0.0, where=self.fixed[0])
            np.copyto(v, 0.0, where=self.fixed[1])
        return np.stack([u, v], axis=-3)

    # -- Solver API -------------------------------------------------------------------------------
    def initial_state(self, seed: int, **params: Any) -> np.ndarray:
        amp = float(params.get("perturbation", self.perturbation))
        rng = np.random.default_rng([int(seed), 0])
        state = np.zeros(self.state_shape)
        state[0] = self.inflow
        if amp > 0:
            # A smooth field sampled at cell centres; the projection makes it divergence-free.
            state += smooth_random_field(self.grid, rng, 2, amp, kmax=3)
        return self.project(state)

    def step(
        self, state: np.ndarray, forcing: np.ndarray | None = None, re: float | None = None, **params: Any
    ) -> np.ndarray:
        state = self.apply_boundaries(state)
        new = self.advect(state)
        new = self.diffuse(new, self.nu(re))
        if forcing is not None:
            new = new + self.dt * np.asarray(forcing, dtype=np.float64)
        return self.project(new)

    def step_batch(
        self, states: np.ndarray, forcing: Any = None, re: Any = None, **params: Any
    ) -> np.ndarray:
        """:meth:`step` of ``(B, 2, ny, nx)`` in array operations; ``re`` is one Reynolds number or
        one per state, ``forcing`` one field or one per state."""
        if not self.batch_native:
            return super().step_batch(states, forcing=forcing, re=re, **params)
        states = np.asarray(states, dtype=np.float64)
        res = np.broadcast_to(np.asarray(self.re if re is None else re, dtype=np.float64), len(states))
        nu = np.array([self.nu(r) for r in res])
        new = self.diffuse(self.advect(self.apply_boundaries(states)), nu)
        if forcing is not None:
            new = new + self.dt * np.asarray(forcing, dtype=np.float64)
        return self.project(new)

    # -- resolution transfer ------------------------------------------------------------------------
    def downsample(self, state: np.ndarray, target: Solver | Grid | tuple[int, int]) -> np.ndarray:
        """Flux-conserving restriction: each coarse face gets the mean of the fine faces on it."""
        state = np.asarray(state, dtype=np.float64)
        cy, cx = _target_shape(target)
        ry, rx = _ratio(state.shape[-2:], (cy, cx))
        u = state[..., 0, :, rx - 1 :: rx]  # fine faces lying on coarse right faces
        u = u.reshape(*u.shape[:-2], cy, ry, cx).mean(axis=-2)
        v = state[..., 1, ry - 1 :: ry, :]
        v = v.reshape(*v.shape[:-2], cy, cx, rx).mean(axis=-1)
        return np.stack([u, v], axis=-3)

    def upsample(self, state: np.ndarray, target: Solver | Grid | tuple[int, int]) -> np.ndarray:
        """Prolongation: ``u`` linear in ``x`` and constant in ``y`` within a coarse cell (``v`` alike)."""
        state = np.asarray(state, dtype=np.float64)
        if state.ndim != 3:
            return np.stack([self.upsample(s, target) for s in state])
        fy, fx = _target_shape(target)
        cy, cx = state.shape[-2:]
        ry, rx = _ratio((fy, fx), (cy, cx))
        uf = self._full_u_shape(state[0], cy)  # (cy, cx + 1) coarse faces incl. inflow
        s = np.arange(1, fx + 1) / rx  # fine face positions in coarse face units
        k0 = np.minimum(np.floor(s).astype(int), cx - 1)
        t = s - k0
        u = (1 - t) * uf[:, k0] + t * uf[:, k0 + 1]
        u = np.repeat(u, ry, axis=0)
        vf = np.concatenate([np.zeros((1, cx)), state[1]], axis=0)  # (cy + 1, cx)
        s = np.arange(1, fy + 1) / ry
        m0 = np.minimum(np.floor(s).astype(int), cy - 1)
        t = (s - m0)[:, None]
        v = (1 - t) * vf[m0, :] + t * vf[m0 + 1, :]
        v = np.repeat(v, rx, axis=1)
        return np.stack([u, v])

    def _full_u_shape(self, u: np.ndarray, ny: int) -> np.ndarray:
        return np.concatenate([np.full((ny, 1), self.inflow), u], axis=1)


# -- bilinear sampling ------------------------------------------------------------------------------
# One state goes through scipy's map_coordinates; a batch through the same arithmetic in array
# operations (scipy's generic spline code is slower than this gather), split into the stencil (clamped
# corner index and weights) and the gather, so that samples at fixed positions compute their stencil once.


def _sample(field: np.ndarray, cy: np.ndarray, cx: np.ndarray) -> np.ndarray:
    """Bilinear, edge-clamped (``mode="nearest"``) samples of ``field (h, w)`` or ``(B, h, w)`` at
    fractional indices ``(cy, cx)`` of shape ``(ny, nx)`` or ``(B, ny, nx)``."""
    if field.ndim == 2:
        return map_coordinates(field, [cy, cx], order=1, mode="nearest")
    return _Stencil.of(cy, cx, field.shape[-2:]).gather(field)


class _Stencil(NamedTuple):
    """Bilinear stencil in a ``(h, w)`` field: flat index of each sample's lower-left corner within
    its state and the weights ``ty``, ``tx`` toward the upper and right neighbours."""

    corner: np.ndarray
    ty: np.ndarray
    tx: np.ndarray

    @classmethod
    def of(cls, cy: np.ndarray, cx: np.ndarray, shape: tuple[int, int]) -> _Stencil:
        """Edge-clamped (as ``mode="nearest"``): indices clipped to the field, the corner kept one
        cell inside it so its neighbours exist."""
        h, w = shape
        cy, cx = np.clip(cy, 0.0, h - 1.0), np.clip(cx, 0.0, w - 1.0)
        y0, x0 = np.minimum(np.floor(cy), h - 2.0), np.minimum(np.floor(cx), w - 2.0)
        corner = y0.astype(np.int64)
        corner *= w
        corner += x0.astype(np.int64)
        cy -= y0
        cx -= x0
        return cls(corner, cy, cx)

    def gather(self, field: np.ndarray) -> np.ndarray:
        """Samples of every state of ``field (B, h, w)``, the four corners by flat offsets."""
        b, h, w = field.shape
        index = self.corner + (np.arange(b) * (h * w))[:, None, None]
        flat = field.reshape(-1)
        f00 = flat.take(index)
        index += 1
        f01 = flat.take(index)
        index += w - 1
        f10 = flat.take(index)
        index += 1
        f11 = flat.take(index)
        gx = 1.0 - self.tx
        top = gx * f00
        top += self.tx * f01
        bottom = gx * f10
        bottom += self.tx * f11
        top *= 1.0 - self.ty
        bottom *= self.ty
        top += bottom
        return top


class _FixedPoints:
    """Samples at fixed fractional indices ``(cy, cx)`` of an ``(h, w)`` field (positions that do not
    depend on the state): a batch uses the stencil computed here once."""

    def __init__(self, cy: np.ndarray, cx: np.ndarray, shape: tuple[int, int]) -> None:
        self.cy, self.cx = cy, cx
        self.stencil = _Stencil.of(cy, cx, shape)

    def sample(self, field: np.ndarray) -> np.ndarray:
        return _sample(field, self.cy, self.cx) if field.ndim == 2 else self.stencil.gather(field)
