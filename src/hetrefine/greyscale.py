"""Grey scale of a map relative to the particles: the factor that makes its
CTF-modulated projections look like the (normalised) particle images.

Ab-initio maps come on arbitrary scales (and sometimes inverted contrast); the
likelihood needs references on the particles' scale.
"""

from __future__ import annotations

import math

import numpy as np

from hetrefine.ctf import compute_ctf
from hetrefine.fourier import (
    centered_grid_radius,
    half_plane_indices,
    irfft2_centered,
    rfft_frequencies,
)
from hetrefine.projection import PAD, prepare_reference, project
from hetrefine.rotations import random_rotations
from hetrefine.sampling import so3_grid


def estimate_grey_scale(
    vol, images, spectra, ctf, mask, px: float, radius_px: float, seed: int = 0
):
    """Scale ``a`` that puts a map on the particles' grey scale, and the sign evidence.

    Magnitude: the particles' signal variance inside the mask's disc (total minus the
    unit noise variance of normalised images) over that of CTF-modulated projections
    of the map at random poses. Sign: the median least-squares scale of each particle
    at its best pose (by normalised correlation) on a coarse grid at low resolution.
    """
    box = vol.shape[0]
    rng = np.random.default_rng([seed, 77])
    grid = prepare_reference(vol * mask, PAD)
    n = len(images)
    kyy, kxx = rfft_frequencies(box)
    kx, ky = kxx.ravel().astype(np.float32), kyy.ravel().astype(np.float32)
    rots = random_rotations(n, rng).astype(np.float32)
    freq = 1.0 / (box * px)
    c = compute_ctf(ctf, kx * freq, ky * freq)
    proj = irfft2_centered(
        (project(grid, rots, kx, ky, PAD) * c).reshape(n, box, box // 2 + 1), box
    )
    disc = centered_grid_radius((box, box)) <= radius_px
    var_img = float(images[:, disc].var(axis=1).mean())
    var_proj = float(proj[:, disc].var(axis=1).mean())
    signal = max(var_img - 1.0, 0.05 * var_img)
    mag = math.sqrt(signal / max(var_proj, 1e-30))
    # sign: correlation at the best of a coarse grid, low resolution
    flat, kx2, ky2 = half_plane_indices(box, min(box / 2 - 1, 0.25 * box))
    y = spectra.reshape(n, -1)[:, flat]  # rfft2_centered(images), computed once by the caller
    c2 = compute_ctf(ctf, kx2 * freq, ky2 * freq)
    grid_rots = so3_grid(20).astype(np.float32)
    a = project(grid, grid_rots, kx2, ky2, PAD)  # (R, m)
    xr = np.concatenate([(y * c2).real, (y * c2).imag], 1)
    ar = np.concatenate([a.real, a.imag], 1)
    cross = xr @ ar.T  # (n, R)
    norm = (c2 * c2) @ (np.abs(a) ** 2).T
    cc = cross / np.sqrt(np.maximum(norm, 1e-30))
    best = np.abs(cc).argmax(axis=1)
    per = cross[np.arange(n), best] / np.maximum(norm[np.arange(n), best], 1e-30)
    sign = 1.0 if np.median(per) >= 0 else -1.0
    return sign * mag
