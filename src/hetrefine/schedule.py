"""The resolution schedule: how far out in Fourier space each iteration aligns.

Iteration 0 starts at the initial low-pass (``initial_lowpass_A``; by default
:func:`start_resolution_A`, which follows the particle's size as measured on the
initial models); each iteration's limit is a few shells beyond the best class's
FSC 0.143 resolution (never lower than the previous limit), clamped to
[4 px, Nyquist - 1] and to ``max_resolution_A``. From one map too the limit follows the
best class from iteration 1: holding it at the start for the first three iterations
(RELION's several iterations at the initial resolution) left the state the common map
explains worst with wrong poses for longer (bench/RESULTS.md section 9, "One map
without the hold").
"""

from __future__ import annotations

import numpy as np

MARGIN_SHELLS = 3.0
"""The next limit is this many shells beyond the best class's resolution shell."""


def resolution_limit_px(r: float, box: int, px: float, max_resolution_A: float | None) -> float:
    """Clamp a resolution radius (box pixels) to [4, Nyquist - 1] and to ``max_resolution_A``."""
    r_max = box / 2 - 1
    if max_resolution_A:
        r_max = min(r_max, box * px / float(max_resolution_A))
    return float(min(max(r, 4.0), r_max))


def next_resolution_limit(
    previous_px: float, best_shell: float, box: int, px: float, max_resolution_A: float | None
) -> float:
    """The next iteration's limit (box pixels) from the previous one and the best
    class's FSC 0.143 shell."""
    return resolution_limit_px(
        max(previous_px, best_shell + MARGIN_SHELLS), box, px, max_resolution_A
    )


START_ELEMENTS = 3.5
"""The default start resolution: the particle's diameter spans this many resolution
elements. At a fixed 30 A a 24 kDa protein (diameter ~50 A) is a blob of under two
elements, and its compact state never finds its poses (bench/RESULTS.md section 9)."""

START_BOUNDS_A = (12.0, 40.0)
"""The default start resolution stays within these bounds (Angstrom): no finer than
12 A, where ab-initio maps stop being trustworthy, no coarser than 40 A."""


def map_diameter_A(vol: np.ndarray, px: float, threshold: float = 0.1) -> float:
    """Diameter (Angstrom) of the particle in a map (D, D, D) at ``px`` A/px: the
    diameter of the uniform sphere with the same radius of gyration,
    2 sqrt(5/3) Rg, over the voxels inside the box's sphere whose density (above
    the map's median, the solvent) exceeds ``threshold`` of its maximum. A map with
    inverted contrast (deepest deviation negative) is measured flipped."""
    v = np.asarray(vol, np.float32)
    n = v.shape[0]
    a = np.arange(n, dtype=np.float32) - n // 2
    inside = a[:, None, None] ** 2 + a[None, :, None] ** 2 + a[None, None, :] ** 2 <= (n / 2) ** 2
    v = v - np.median(v[inside])
    if -v[inside].min() > v[inside].max():
        v = -v
    w = np.where(inside & (v > threshold * v[inside].max()), v, 0.0).astype(np.float64)
    mass = w.sum()
    if mass <= 0:
        return float(n * px)
    # second moments from the three marginal profiles (no coordinate cubes)
    rg2 = 0.0
    for axis in range(3):
        profile = w.sum(axis=tuple(i for i in range(3) if i != axis)) / mass
        mean = (profile * a).sum()
        rg2 += (profile * (a - mean) ** 2).sum()
    return float(2.0 * np.sqrt(5.0 / 3.0 * rg2) * px)


def start_resolution_A(diameter_A: float, box: int, px: float) -> float:
    """The default start resolution (Angstrom) for a particle of ``diameter_A``:
    diameter / START_ELEMENTS, within START_BOUNDS_A and no finer than 3 pixels
    (two thirds of Nyquist) of the refinement box."""
    lo, hi = START_BOUNDS_A
    return float(min(max(diameter_A / START_ELEMENTS, lo, 3.0 * px), hi))


def start_resolution_for_maps(maps, box: int, px: float, default_px: float) -> float:
    """:func:`start_resolution_A` for the median diameter (:func:`map_diameter_A`) of
    the initial models ``maps``: (volume, voxel size) pairs, a voxel size <= 0 read
    as ``default_px`` (median: a decoy blob among the models does not set it)."""
    diameters = [map_diameter_A(v, vpx if vpx > 0 else default_px) for v, vpx in maps]
    return start_resolution_A(float(np.median(diameters)), box, px)
