"""What the Burgers solver and its torch twin share: the grid presets and the checks of their common
parameters. Both import this module; the twin never imports the numpy solver (no import circle)."""

from __future__ import annotations

from collections.abc import Sequence

from .base import MAX_COURANT, Grid, parse_resolution, require

PRESETS: dict[str, tuple[int, int]] = {"reference": (128, 128), "source": (32, 32)}


def burgers_grid(
    resolution: int | str | Sequence[int],
    size: float,
    nu: float,
    dt: float,
    velocity_amplitude: float = 1.0,
    forcing_amplitude: float = 0.0,
    diffusion: bool = True,
) -> Grid:
    """The periodic ``size x size`` grid, after checking the parameters and the stability limit."""
    shape = parse_resolution(resolution, PRESETS)
    require(size > 0 and dt > 0, f"size={size} and dt={dt} must be > 0")
    require(nu >= 0 and (nu > 0 or not diffusion), f"nu={nu} must be > 0 (or diffusion=false)")
    require(velocity_amplitude >= 0 and forcing_amplitude >= 0, "amplitudes must be >= 0")
    courant = dt * max(velocity_amplitude, 1e-12) * max(shape) / size
    require(
        courant <= MAX_COURANT,
        f"dt={dt} is beyond the stability limit: Courant number dt * velocity_amplitude / dx = "
        f"{courant:.3g} > {MAX_COURANT:g} on the {shape[0]}x{shape[1]} grid",
    )
    return Grid(shape=shape, size=(float(size), float(size)), boundary="periodic")
