"""2D forced viscous Burgers equation on a periodic square (Solver-in-the-Loop's Burgers setup).

    du/dt + (u . grad) u = nu * lap(u) + f,      u = (u, v),  x in [0, L)^2 periodic

Setup (defaults): ``L = 32`` (so the 32x32 *source* grid has unit spacing and the 128x128
*reference* grid has spacing 1/4), ``nu = 0.1``, ``dt = 0.1``. Each seed draws a smooth random
initial velocity and a smooth, time-independent random forcing, both sums of a few low Fourier
modes (wavenumbers ``|k| <= 4`` in units of ``2 pi / L``) that are evaluated analytically at the
cell centres, so the coarse and fine solvers see the same continuous fields.

Discretisation, one step of length ``dt`` (cell-centred, collocated ``u`` and ``v``):

1. advection: semi-Lagrangian, first-order backtrace ``x - dt u(x)`` and periodic bilinear
   interpolation (unconditionally stable, numerically diffusive on coarse grids; this is the error
   the correction network learns to remove);
2. forcing: ``u += dt * f``;
3. diffusion: implicit Euler, ``(I - dt nu L) u_new = u`` with the periodic 5-point Laplacian ``L``,
   a ``scipy.sparse`` matrix factorised once per solver (``scipy.sparse.linalg.factorized``).

For a Fourier mode with wavenumbers ``(ky, kx)`` the diffusion step multiplies by
``1 / (1 + dt nu lam)`` with ``lam = 4 sin^2(kx dx / 2) / dx^2 + 4 sin^2(ky dy / 2) / dy^2``
(:meth:`BurgersSolver.laplacian_eigenvalue`); :mod:`.burgers_torch` uses exactly that to solve
the same system with an FFT.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.fft
import scipy.sparse as sp
from scipy.sparse.linalg import factorized

from .base import Grid, Solver, require
from .burgers_setup import burgers_grid

__all__ = ["BurgersSolver", "periodic_bilinear", "periodic_bilinear_batch", "smooth_random_field"]

def periodic_bilinear(field: np.ndarray, py: np.ndarray, px: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of ``field[..., ny, nx]`` at fractional cell indices ``(py, px)``
    with periodic wrap-around (the same arithmetic as the torch twin)."""
    ny, nx = field.shape[-2:]
    y0 = np.floor(py)
    x0 = np.floor(px)
    fy = py - y0
    fx = px - x0
    iy0 = y0.astype(np.int64) % ny
    ix0 = x0.astype(np.int64) % nx
    iy1 = (iy0 + 1) % ny
    ix1 = (ix0 + 1) % nx
    f00 = field[..., iy0, ix0]
    f01 = field[..., iy0, ix1]
    f10 = field[..., iy1, ix0]
    f11 = field[..., iy1, ix1]
    return (1.0 - fy) * ((1.0 - fx) * f00 + fx * f01) + fy * ((1.0 - fx) * f10 + fx * f11)


def periodic_bilinear_batch(fields: np.ndarray, py: np.ndarray, px: np.ndarray) -> np.ndarray:
    """:func:`periodic_bilinear` of a batch: ``fields (B, C, ny, nx)`` at per-sample points ``(B, ny, nx)``.

    Bit-for-bit the per-state arithmetic, in fewer passes over the batch (it is half of a batched
    Burgers step): channels lead (the weights broadcast over them), the fields get one wrapped row and
    column so the four corners are one flat index plus constant offsets (no second modulo), and the
    weighted sums run in place.
    """
    b, c, ny, nx = fields.shape
    y0, x0 = np.floor(py), np.floor(px)
    fy, fx = py - y0, px - x0
    iy0, ix0 = y0.astype(np.int64), x0.astype(np.int64)
    iy0 %= ny
    ix0 %= nx
    w = nx + 1
    wrapped = np.empty((c, b, ny + 1, w))
    wrapped[:, :, :ny, :nx] = fields.transpose(1, 0, 2, 3)
    wrapped[:, :, :ny, nx] = wrapped[:, :, :ny, 0]
    wrapped[:, :, ny] = wrapped[:, :, 0]
    flat = wrapped.reshape(c, -1)
    corner = iy0 * w
    corner += ix0
    corner += (np.arange(b) * ((ny + 1) * w))[:, None, None]
    f00 = np.take(flat, corner, axis=1)
    corner += 1
    f01 = np.take(flat, corner, axis=1)
    corner += nx
    f10 = np.take(flat, corner, axis=1)
    corner += 1
    f11 = np.take(flat, corner, axis=1)
    gx = 1.0 - fx
    top = gx * f00
    top += fx * f01
    bottom = gx * f10
    bottom += fx * f11
    top *= 1.0 - fy
    bottom *= fy
    top += bottom
    return top.transpose(1, 0, 2, 3)


def smooth_random_field(
    grid: Grid, rng: np.random.Generator, channels: int, amplitude: float, kmax: int = 4, n_modes: int = 6
) -> np.ndarray:
    """Sum of ``n_modes`` random periodic Fourier modes per channel, scaled to RMS ``amplitude``.

    The scale uses the analytic RMS of the continuous field, so every resolution samples the same
    continuous function.
    """
    yy, xx = grid.cell_centers()
    ly, lx = grid.size
    out = np.zeros((channels, *grid.shape))
    for c in range(channels):
        coeffs = []
        for _ in range(n_modes):
            while True:
                ky, kx = (int(k) for k in rng.integers(-kmax, kmax + 1, size=2))
                if (ky, kx) != (0, 0):
                    break
            a = rng.normal()
            phase = rng.uniform(0.0, 2.0 * math.pi)
            coeffs.append(a)
            out[c] += a * np.sin(2.0 * math.pi * (kx * xx / lx + ky * yy / ly) + phase)
        rms = math.sqrt(0.5 * sum(a * a for a in coeffs)) or 1.0
        out[c] *= amplitude / rms
    return out


def periodic_laplacian(grid: Grid) -> sp.csr_matrix:
    """5-point periodic Laplacian on ``grid`` acting on row-major flattened ``(ny, nx)`` fields."""
    ny, nx = grid.shape
    dy, dx = grid.spacing

    def second_diff(n: int, h: float) -> sp.csr_matrix:
        if n == 1:
            return sp.csr_matrix((1, 1))
        d = sp.diags([np.ones(n - 1), -2.0 * np.ones(n), np.ones(n - 1)], [-1, 0, 1], shape=(n, n)).tolil()
        d[0, n - 1] += 1.0
        d[n - 1, 0] += 1.0
        return (d.tocsr() / (h * h)).tocsr()

    return (sp.kron(second_diff(ny, dy), sp.eye(nx)) + sp.kron(sp.eye(ny), second_diff(nx, dx))).tocsr()


class BurgersSolver(Solver):
    """Forced viscous Burgers on a periodic ``size x size`` square; channels ``("u", "v")``.

    Args:
        resolution: ``"reference"`` (128x128), ``"source"`` (32x32), an int ``n`` (``n x n``) or
            ``(ny, nx)``.
        size: domain side length ``L`` (default 32).
        nu: kinematic viscosity.
        dt: time step.
        velocity_amplitude: RMS of each initial velocity component.
        forcing_amplitude: RMS of each forcing component.
        kmax: largest wavenumber (in units of ``2 pi / L``) of the random fields.
        advection, diffusion: switch the terms off (for tests and ablations).
    """

    name = "burgers"
    channels = ("u", "v")
    # Small grids so the default ZO run fits a few CPU minutes; the paper-scale grids are the presets
    # solver.reference.resolution=reference (128x128) and solver.source.resolution=source (32x32).
    defaults = {"reference": {"resolution": [64, 64]}, "source": {"resolution": [16, 16]}}
    condition_defaults = {"nu": 0.1}
    batch_native = property(lambda self: self.native_batch(BurgersSolver))

    def __init__(
        self,
        resolution: int | str | Sequence[int] = "source",
        size: float = 32.0,
        nu: float = 0.1,
        dt: float = 0.1,
        velocity_amplitude: float = 1.0,
        forcing_amplitude: float = 0.1,
        kmax: int = 4,
        advection: bool = True,
        diffusion: bool = True,
    ) -> None:
        self.grid = burgers_grid(resolution, size, nu, dt, velocity_amplitude, forcing_amplitude, diffusion)
        shape = self.grid.shape
        self.nu = float(nu)
        self.dt = float(dt)
        self.velocity_amplitude = float(velocity_amplitude)
        self.forcing_amplitude = float(forcing_amplitude)
        self.kmax = int(kmax)
        self.advection = bool(advection)
        self.diffusion = bool(diffusion) and self.nu > 0
        self._solvers: dict[float, Any] = {}  # the factorised implicit-diffusion system per viscosity
        jj, ii = np.meshgrid(
            np.arange(shape[0], dtype=np.float64), np.arange(shape[1], dtype=np.float64), indexing="ij"
        )
        self._jj, self._ii = jj, ii

    # -- per-seed data ---------------------------------------------------------------------------
    def initial_state(self, seed: int, **params: Any) -> np.ndarray:
        amp = float(params.get("velocity_amplitude", self.velocity_amplitude))
        rng = np.random.default_rng([int(seed), 0])
        return smooth_random_field(self.grid, rng, 2, amp, kmax=self.kmax)

    def forcing(self, seed: int, **params: Any) -> np.ndarray:
        """The time-independent forcing field ``(2, ny, nx)`` of simulation ``seed``."""
        amp = float(params.get("forcing_amplitude", self.forcing_amplitude))
        rng = np.random.default_rng([int(seed), 1])
        return smooth_random_field(self.grid, rng, 2, amp, kmax=self.kmax)

    def conditions(self, seed: int, nu: float | None = None, **params: Any) -> dict[str, Any]:
        """The seed's forcing and the viscosity ``nu`` (a condition; default: the constructor's)."""
        nu = self.nu if nu is None else float(nu)
        require(nu > 0 or not self.diffusion, f"condition nu={nu} must be > 0")
        return {"forcing": self.forcing(seed, **params), "nu": nu}

    # -- dynamics -----------------------------------------------------------------------------
    def advect(self, state: np.ndarray) -> np.ndarray:
        dy, dx = self.grid.spacing
        u, v = state[0], state[1]
        py = self._jj - (self.dt / dy) * v
        px = self._ii - (self.dt / dx) * u
        return periodic_bilinear(state, py, px)

    def _solver(self, nu: float):
        """The sparse LU of ``I - dt nu L``, factorised once per viscosity."""
        if nu not in self._solvers:
            n = self.grid.shape[0] * self.grid.shape[1]
            a = sp.eye(n, format="csc") - (self.dt * nu) * periodic_laplacian(self.grid).tocsc()
            self._solvers[nu] = factorized(a.tocsc())
        return self._solvers[nu]

    def diffuse(self, state: np.ndarray, nu: float | None = None) -> np.ndarray:
        if not self.diffusion:
            return state
        c = state.shape[0]
        rhs = state.reshape(c, -1).T  # (n, C)
        out = self._solver(self.nu if nu is None else float(nu))(np.ascontiguousarray(rhs))
        return np.asarray(out).T.reshape(state.shape)

    def step(
        self, state: np.ndarray, forcing: np.ndarray | None = None, nu: float | None = None, **params: Any
    ) -> np.ndarray:
        state = np.asarray(state, dtype=np.float64)
        new = self.advect(state) if self.advection else state.copy()
        if forcing is not None:
            new = new + self.dt * np.asarray(forcing, dtype=np.float64)
        return self.diffuse(new, nu)

    def step_batch(self, states: np.ndarray, forcing: Any = None, nu: Any = None, **params: Any) -> np.ndarray:
        """:meth:`step` on ``(B, 2, ny, nx)`` in array operations: one backtrace, one gather and one
        multi-right-hand-side solve for the whole batch; ``forcing`` is one field or one per state,
        ``nu`` one viscosity or one per state."""
        if not self.batch_native:
            return super().step_batch(states, forcing=forcing, nu=nu, **params)
        states = np.asarray(states, dtype=np.float64)
        if self.advection:
            dy, dx = self.grid.spacing
            py = self._jj - (self.dt / dy) * states[:, 1]
            px = self._ii - (self.dt / dx) * states[:, 0]
            new = periodic_bilinear_batch(states, py, px)
        else:
            new = states.copy()
        if forcing is not None:
            new = new + self.dt * np.asarray(forcing, dtype=np.float64)
        if not self.diffusion:
            return new
        # The periodic implicit-Euler system is diagonal in Fourier space: one batched FFT solve
        # (SuperLU loops over right-hand sides: slower than the per-state loop).
        nu = np.asarray(self.nu if nu is None else nu, dtype=np.float64).reshape(-1, 1, 1, 1)
        return scipy.fft.irfft2(scipy.fft.rfft2(new) * self._fourier_factor(nu), s=self.grid.shape)

    def _fourier_factor(self, nu: np.ndarray) -> np.ndarray:
        """:meth:`diffusion_factor` of every ``rfft2`` mode for viscosities ``nu (B, 1, 1, 1)``."""
        (ny, nx), (dy, dx) = self.grid.shape, self.grid.spacing
        lam_y = 4.0 * np.sin(np.pi * np.arange(ny) / ny) ** 2 / dy**2
        lam_x = 4.0 * np.sin(np.pi * np.arange(nx // 2 + 1) / nx) ** 2 / dx**2
        return 1.0 / (1.0 + self.dt * nu * (lam_y[:, None] + lam_x[None, :]))

    # -- analysis helpers -------------------------------------------------------------------------
    def laplacian_eigenvalue(self, ky: int, kx: int) -> float:
        """``-lam`` is the eigenvalue of the discrete Laplacian for integer wavenumbers ``(ky, kx)``."""
        (ny, nx), (dy, dx) = self.grid.shape, self.grid.spacing
        return 4.0 * math.sin(math.pi * kx / nx) ** 2 / dx**2 + 4.0 * math.sin(math.pi * ky / ny) ** 2 / dy**2

    def diffusion_factor(self, ky: int, kx: int) -> float:
        """Per-step amplification of Fourier mode ``(ky, kx)`` under pure (implicit) diffusion."""
        return 1.0 / (1.0 + self.dt * self.nu * self.laplacian_eigenvalue(ky, kx))

    def torch_twin(self):
        """The differentiable torch version of this solver (:class:`.burgers_torch.BurgersTorch`)."""
        from .burgers_torch import BurgersTorch

        return BurgersTorch.from_solver(self)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(nu=self.nu, advection=self.advection, diffusion=self.diffusion)
        return d
