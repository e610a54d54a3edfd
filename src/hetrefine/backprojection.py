"""Backprojection of a particle batch into one class's Fourier sums.

Each particle i contributes at its pose (rotation R_i, shift t_i) with weight w_i
(its class posterior; 1 for a hard assignment) and intensity scale a_i:

    num += w_i a_i C_i conj(ph_{t_i}) Y_i / sigma2       wgt += w_i (a_i C_i)^2 / sigma2

on the Hermitian half ball of the padded Fourier grid
(``projection.backproject_packed``), within the backprojection radius. The
reconstruct step sums the shards' sums and Wiener-filters them
(``hetrefine.reconstruction``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hetrefine.backend import get_xp, to_host
from hetrefine.fourier import half_plane_indices
from hetrefine.projection import (
    PAD,
    backproject_packed,
    backproject_poses_packed,
    grid_half_size,
    half_ball_mask,
    phase_shifts,
)


def backprojection_radius(res_limit_px: float, box: int) -> float:
    """Radius (box pixels) up to which particles are backprojected: a margin beyond
    the alignment limit, so the half-set FSC can show that the resolution improved
    (as RELION backprojects within its current image size), never past Nyquist - 1.
    The sums grids, their files and the reconstruct memory shrink with it."""
    return float(min(box / 2 - 1, 1.25 * res_limit_px + 4))


@dataclass
class SumsGrid:
    """The frequencies backprojected and the packed grid they go into.

    ``flat`` indices of the rfft half plane within ``radius`` (DC included),
    ``kx``/``ky`` their frequencies (device arrays), ``dc_weight`` 1/2 at the
    origin (which the half plane holds once but the Friedel completion counts
    twice), ``size`` the odd grid edge and ``n_packed`` the half-ball length.
    """

    box: int
    radius: float
    flat: object
    kx: object
    ky: object
    dc_weight: object
    size: int
    n_packed: int

    @classmethod
    def create(cls, box: int, radius: float, xp=np, full_grid: bool = False) -> SumsGrid:
        """Frequencies within ``radius`` (box pixels); the grid sized for the radius,
        or for the whole box with ``full_grid``."""
        flat, kx, ky = half_plane_indices(box, radius, xp, include_dc=True)
        dc_w = xp.where((kx == 0) & (ky == 0), 0.5, 1.0).astype(xp.float32)
        size = 2 * grid_half_size(box, PAD, None if full_grid else radius) + 1
        return cls(box, radius, flat, kx, ky, dc_w, size, int(half_ball_mask(size).sum()))

    def shells(self):
        """Integer shell of each frequency."""
        xp = get_xp(self.kx)
        return xp.rint(xp.sqrt(self.kx**2 + self.ky**2)).astype(xp.int64)


def centred_images(y, shifts_px, grid: SumsGrid):
    """``Y conj(ph_t)``: the particles' transforms (n, m) moved so their content is centred.

    (Both factors named: numpy would otherwise compute into the temporary on the
    right, conj(ph) * Y, which rounds differently from Y * conj(ph) under FMA.)"""
    ph_conj = phase_shifts(grid.kx, grid.ky, shifts_px, grid.box).conj()
    return y * ph_conj


def marginalised_class_sums(
    y, ctf, grid: SumsGrid, weight, scale, inv_sigma2, sig_rots, sig_shifts, sig_weights
):
    """One class's sums with each particle over its significant poses (pose
    marginalisation, as RELION's maximisation step): particle i enters at pose j with
    weight ``weight[i] * sig_weights[i, j]``, its transform moved back by that pose's
    shift. ``y`` (n, m) the particles' transforms as they are (not centred), ``ctf``
    (n, m), ``scale`` (n,), ``inv_sigma2`` (m,) or (n, m); ``sig_rots`` (n, P, 3, 3),
    ``sig_shifts`` (n, P, 2) pixels and ``sig_weights`` (n, P) from
    ``alignment.PoseResult`` (zero weights pad). With one pose of weight 1 it is the
    best-pose backprojection of the centred image (tests/test_marginalisation.py). Returns (num complex128, wgt float64),
    (n_packed,) each, on the host."""
    xp = get_xp(y)
    f = grid.dc_weight * inv_sigma2  # inv_sigma2 (m,), or (n, m) per particle
    f = f if f.ndim == 2 else f[None, :]
    wk, ak = weight[:, None], scale[:, None]
    vals = wk * ak * ctf * y * f
    ws = wk * (ak * ctf) ** 2 * f
    n_acc = xp.zeros(grid.n_packed, xp.complex128)
    w_acc = xp.zeros(grid.n_packed, xp.float64)
    backproject_poses_packed(
        n_acc,
        w_acc,
        grid.size,
        sig_rots,
        sig_shifts,
        sig_weights,
        grid.kx,
        grid.ky,
        vals,
        ws,
        grid.box,
        PAD,
    )
    return to_host(n_acc), to_host(w_acc)


def hard_class_sums(y, ctf, rots, shifts_px, grid: SumsGrid):
    """One class's sums from particles hard-assigned to it, unweighted (the
    hard-assignment maps): (num complex128, wgt float64) on the host."""
    ph = phase_shifts(grid.kx, grid.ky, shifts_px, grid.box)
    return _accumulate(grid.dc_weight * ctf * y * ph.conj(), grid.dc_weight * ctf**2, rots, grid)


def _accumulate(vals, ws, rots, grid: SumsGrid):
    xp = get_xp(vals)
    n_acc = xp.zeros(grid.n_packed, xp.complex128)
    w_acc = xp.zeros(grid.n_packed, xp.float64)
    backproject_packed(n_acc, w_acc, grid.size, rots, grid.kx, grid.ky, vals, ws, PAD)
    return to_host(n_acc), to_host(w_acc)
