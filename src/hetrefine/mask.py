"""Masks of the references: the soft spherical mask (1 inside the inner diameter, raised
cosine to 0 at the outer), and a user's focused mask (``mask.file``) brought to the
refinement box and pixel size.

A focused mask is checked (:func:`mask_value_problem`: values in [0, 1] up to
:data:`VALUE_TOLERANCE`, not all zero) and resampled as the initial models are
(``fourier.resample_volume``). A binary mask (only 0 and 1, :func:`is_binary`) gets a
raised-cosine edge of ``soft_edge_A`` outside it (:func:`soften_binary`, the edge
``relion_mask_create --width_soft_edge`` adds): a hard edge in the references rings in
Fourier space. A mask that already has soft values is used as it is (clipped to [0, 1]
after resampling, which overshoots at its edge).

The solvent mask (``mask.solvent``, :func:`solvent_mask`) is the initial models'
envelope: each model low-passed to :data:`SOLVENT_LOWPASS_A`, its solvent level (the
median inside the spherical mask) taken off, thresholded at a fraction of its own
maximum (so any grey scale and either contrast give the same mask), the union over the
models extended by ``extend_A``, given a raised-cosine edge and multiplied by the
spherical mask. It keeps the noise of the solvent around the particle out of the
references the particles are aligned and classified against.
"""

from __future__ import annotations

import numpy as np

from hetrefine.fourier import centered_grid_radius, lowpass_volume, resample_volume

VALUE_TOLERANCE = 1e-3
"""How far a mask value may lie outside [0, 1] (float rounding) before it is refused."""


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


def mask_value_problem(vol: np.ndarray) -> str | None:
    """What makes ``vol`` unusable as a mask, in words, or None: a value outside [0, 1]
    beyond :data:`VALUE_TOLERANCE`, NaN/Inf, or no voxel above the tolerance (all zero)."""
    lo, hi = float(np.min(vol)), float(np.max(vol))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "holds NaN or Inf values; a mask holds values in [0, 1]"
    if lo < -VALUE_TOLERANCE or hi > 1 + VALUE_TOLERANCE:
        return (
            f"values run from {lo:.4g} to {hi:.4g}, but a mask holds values in [0, 1] (1 kept, "
            "0 masked out): is this a map? Make a mask with relion_mask_create or CryoSPARC's "
            "Volume Tools"
        )
    if hi <= VALUE_TOLERANCE:
        return "every voxel is 0: the mask keeps nothing"
    return None


def is_binary(vol: np.ndarray) -> bool:
    """True when every value is 0 or 1 (within :data:`VALUE_TOLERANCE`): a hard-edged mask."""
    return bool(np.all((np.abs(vol) <= VALUE_TOLERANCE) | (np.abs(vol - 1) <= VALUE_TOLERANCE)))


def soften_binary(inside: np.ndarray, edge_px: float) -> np.ndarray:
    """A binary mask (bool (D, D, D)) with a raised-cosine edge outside it: 1 inside,
    0.5 + 0.5 cos(pi d / edge_px) at distance d (voxels, Euclidean, to the nearest voxel
    inside) for d < edge_px, 0 beyond; float32. ``edge_px`` <= 0: the hard mask."""
    if edge_px <= 0:
        return inside.astype(np.float32)
    from scipy.ndimage import distance_transform_edt

    d = distance_transform_edt(~inside)
    soft = np.where(d < edge_px, 0.5 + 0.5 * np.cos(np.pi * np.minimum(d / edge_px, 1.0)), 0.0)
    return soft.astype(np.float32)


def focus_mask(
    vol: np.ndarray, vol_px: float, box: int, pixel_size: float, soft_edge_A: float
) -> tuple[np.ndarray, bool]:
    """A user's mask (a cube checked by :func:`mask_value_problem`, voxel ``vol_px`` A) at
    ``box`` voxels of ``pixel_size`` A, float32 in [0, 1], and whether it was binary.

    Resampled as the initial models are (``fourier.resample_volume``: Fourier rescale,
    then centred crop or zero pad). A binary mask is thresholded at 0.5 after
    resampling and given a raised-cosine edge ``soft_edge_A`` wide outside it
    (:func:`soften_binary`); a soft mask is clipped to [0, 1] (the Fourier resampling
    overshoots at its edges)."""
    binary = is_binary(vol)
    res = resample_volume(np.asarray(vol, np.float32), vol_px, box, pixel_size)
    if binary:
        return soften_binary(res >= 0.5, soft_edge_A / pixel_size), True
    return np.clip(res, 0.0, 1.0).astype(np.float32), False


def focus_mask_summary(
    vol: np.ndarray, vol_px: float, box: int, pixel_size: float, soft_edge_A: float
) -> str:
    """What :func:`focus_mask` does to ``vol`` (voxel ``vol_px`` A), in words: its box and
    pixel size, whether it is resampled, and whether it is binary (and softened)."""
    n = vol.shape[0]
    text = f"box {n} px at {vol_px:.4g} A/px"
    if n != box or abs(vol_px - pixel_size) > 1e-3 * pixel_size:
        text += f", resampled to box {box} at {pixel_size:.4g} A/px"
    if not is_binary(vol):
        return text + "; soft-edged, used as it is"
    if soft_edge_A > 0:
        return text + f"; binary, softened with a {soft_edge_A:g} A raised-cosine edge"
    return text + "; binary, used with its hard edge"


SOLVENT_LOWPASS_A = 20.0
"""The initial models are low-passed to this resolution (Angstrom; no finer than 2 px)
before their envelope is thresholded: ab-initio maps carry noise at high resolution."""


def envelope(vol: np.ndarray, pixel_size: float, threshold: float, sphere: np.ndarray):
    """The voxels (bool (D, D, D)) of one model ``vol`` (D, D, D) at ``pixel_size`` A/px
    inside its envelope, and the threshold used in the model's own units.

    The model is low-passed to :data:`SOLVENT_LOWPASS_A`, its solvent level (median
    where ``sphere`` > 0.5) subtracted and its contrast flipped if its deepest deviation
    is negative; the envelope is where the result inside ``sphere`` exceeds ``threshold``
    x its maximum there, so it does not depend on the model's grey scale. The
    threshold returned is in the low-passed model's units (solvent level included)."""
    v = lowpass_volume(np.asarray(vol, np.float32), max(SOLVENT_LOWPASS_A, 2 * pixel_size),
                       pixel_size)  # fmt: skip
    inside = sphere > 0.5
    solvent = float(np.median(v[inside]))
    v = v - solvent
    sign = -1.0 if -v[inside].min() > v[inside].max() else 1.0
    v = sign * v
    level = threshold * float(v[inside].max())
    return inside & (v > level), solvent + sign * level


def solvent_mask(
    models, pixel_size: float, sphere: np.ndarray, threshold: float, extend_A: float,
    edge_A: float,
) -> np.ndarray:  # fmt: skip
    """The solvent mask (D, D, D) float32 in [0, 1] from the initial models ``models``
    (each (D, D, D) at the refinement box, ``pixel_size`` A/px): the union of their
    envelopes (:func:`envelope` at ``threshold`` of each model's maximum), extended by
    ``extend_A`` (Euclidean distance), a raised-cosine edge ``edge_A`` wide outside
    that (:func:`soften_binary`), times the spherical mask ``sphere`` (D, D, D)."""
    from scipy.ndimage import distance_transform_edt

    union = np.zeros(sphere.shape, bool)
    for vol in models:
        union |= envelope(vol, pixel_size, threshold, sphere)[0]
    if not union.any():
        return np.asarray(sphere, np.float32)
    if extend_A > 0:
        union = distance_transform_edt(~union) <= extend_A / pixel_size
    return (soften_binary(union, edge_A / pixel_size) * sphere).astype(np.float32)
