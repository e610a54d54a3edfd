"""Soft spherical mask: 1 inside the inner diameter, raised cosine to 0 at the outer."""

from __future__ import annotations

import numpy as np

from hetrefine.fourier import centered_grid_radius


def default_mask_diameters(
    box: int, pixel_size: float, inner_A: float | None, outer_A: float | None
) -> tuple[float, float]:
    """Inner and outer diameters in Angstrom with hetrefine's defaults.

    No inner: 0.75 of the box. No outer: 1.2 x inner, capped at the box width.
    """
    box_A = box * pixel_size
    if inner_A is None:
        inner_A = 0.75 * box_A
    if outer_A is None:
        outer_A = min(1.2 * inner_A, box_A)
    return float(inner_A), float(outer_A)


def particle_diameter(diameter_A: float | None, box: int, pixel_size: float) -> float:
    """The particle diameter in Angstrom: as given, or 0.75 of the box."""
    return float(diameter_A) if diameter_A else 0.75 * box * pixel_size


def mask_diameters(
    box: int,
    pixel_size: float,
    particle_diameter_A: float | None,
    inner_A: float | None,
    outer_A: float | None,
) -> tuple[float, float]:
    """Inner and outer mask diameters (Angstrom): the inner defaults to the particle
    diameter (itself defaulting to 0.75 of the box), the outer to 1.2 x inner."""
    inner = inner_A or particle_diameter(particle_diameter_A, box, pixel_size)
    return default_mask_diameters(box, pixel_size, inner, outer_A)


def soft_sphere(box: int, pixel_size: float, inner_A: float, outer_A: float, xp=np):
    """Soft spherical mask (D, D, D) float32 centred at D//2.

    Value 1 within radius inner_A/2, 0.5 + 0.5 cos(pi t) for t from 0 to 1 across
    the edge, 0 beyond outer_A/2 (and so 0 in the corners).
    """
    r = centered_grid_radius((box,) * 3, xp) * pixel_size
    ri, ro = inner_A / 2.0, outer_A / 2.0
    if ro <= ri:
        return (r <= ri).astype(xp.float32)
    t = xp.clip((r - ri) / (ro - ri), 0.0, 1.0)
    return (0.5 + 0.5 * xp.cos(np.pi * t)).astype(xp.float32)
