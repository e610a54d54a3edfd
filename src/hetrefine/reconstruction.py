"""Reconstruction from backprojected sums: Wiener filter, gridding correction.

Inputs are the numerator sum_i CTF_i * Y_i / sigma2 and the weight
sum_i CTF_i^2 / sigma2 accumulated by ``projection.backproject`` on an odd
Fourier cube (half-plane slices; :func:`projection.hermitian_complete` adds
the Friedel mates; the workflow's align jobs keep them packed on the half ball,
``projection.backproject_packed``, and ``hermitian_unpack`` gives the complete
cube). The map estimate per frequency is

    V(k) = num(k) / (wgt(k) + mean_shell(wgt)(k) / (tau2_fudge * SNR(k)))

with SNR(k) = FSC(k) / (1 - FSC(k)) from the half-set FSC (the half-map SNR),
as in RELION's tau2 regularisation. Then an inverse real FFT (single precision)
on the padded box, a crop to the box, and division by the trilinear kernel's
transform.
"""

from __future__ import annotations

import numpy as np

from hetrefine.backend import get_fft, get_xp
from hetrefine.fourier import centered_grid_radius
from hetrefine.fsc import masked_fsc_corrected
from hetrefine.projection import PAD, hermitian_unpack, sinc2_profile
from hetrefine.symmetrize import symmetrize_fourier_sums


def snr_from_fsc(curve, fudge: float = 1.0, floor: float = 1e-6):
    """Half-map SNR per shell from a half-set FSC curve, times ``fudge``, floored."""
    c = np.clip(np.asarray(curve, dtype=np.float64), 0.0, 0.999)
    return np.maximum(fudge * c / (1.0 - c), floor)


def wiener_volume(num, wgt, box: int, pad: int, snr=None, radius: float | None = None):
    """Real-space map (D, D, D) float32 from Hermitian-complete sums on an odd cube.

    num, wgt: (n, n, n) with n = 2*half+1 (zero frequency at ``half``).
    snr: per-shell SNR (shells of the box, length >= D//2+1) for the Wiener term;
    None uses a tiny constant regulariser (1e-3 of the shell mean weight).
    radius: frequencies beyond this (box pixels) are set to zero.
    """
    vol_f, rho = wiener_fourier(num, wgt, box, pad, snr)
    return fourier_to_volume(vol_f, rho, box, pad, radius)


def wiener_fourier(num, wgt, box: int, pad: int, snr=None):
    """The Wiener estimate on the odd cube (:func:`wiener_volume`'s Fourier side) and
    each voxel's radius in box pixels."""
    xp = get_xp(num)
    n = num.shape[0]
    rho = centered_grid_radius((n, n, n), xp) / pad  # in box pixels
    shell = xp.rint(rho).astype(xp.int64)
    n_shells = box // 2 + 1
    s_idx = xp.where(shell < n_shells, shell, n_shells - 1).ravel()
    mean_w = xp.bincount(s_idx, weights=wgt.real.ravel(), minlength=n_shells)
    count = xp.bincount(s_idx, minlength=n_shells)
    mean_w = mean_w / xp.maximum(count, 1)
    if snr is None:
        reg_shell = 1e-3 * mean_w
    else:
        snr_x = xp.asarray(np.asarray(snr, dtype=np.float64)[:n_shells])
        reg_shell = mean_w / snr_x
    reg_shell = xp.maximum(reg_shell, 1e-12 * float(mean_w.max() + 1e-30))
    reg = reg_shell[s_idx].reshape(num.shape)
    return num / (wgt.real + reg), rho


def fourier_to_volume(vol_f, rho, box: int, pad: int, radius: float | None = None):
    """Real-space map (D, D, D) float32 from a Fourier estimate on the odd cube: shells
    of the box only (and within ``radius``), inverse real FFT on the padded box, crop,
    gridding correction."""
    xp = get_xp(vol_f)
    fft = get_fft(xp)
    half = vol_f.shape[0] // 2
    in_range = xp.rint(rho) < box // 2 + 1
    keep = in_range if radius is None else in_range & (rho <= radius)
    vol_f = xp.where(keep, vol_f, 0)
    size = pad * box
    c = size // 2
    # the cube is Hermitian: a real inverse FFT (single precision) of its kx >= 0 half,
    # placed straight into FFT order (no shifts of the padded volume)
    k_lo, k_hi = max(-half, -c), min(half, c - 1)  # frequencies that fit the padded box
    k = xp.arange(k_lo, k_hi + 1)
    spec = xp.zeros((size, size, c + 1), dtype=xp.complex64)
    spec[xp.ix_(k % size, k % size, k[k >= 0])] = vol_f[
        xp.ix_(k + half, k + half, k[k >= 0] + half)
    ]
    real = fft.irfftn(spec, s=(size, size, size)) * box
    wrap = xp.arange(-(box // 2), box - box // 2) % size  # the centred box, in FFT order
    vol = real[xp.ix_(wrap, wrap, wrap)]
    s = sinc2_profile(box, pad, xp)
    vol = vol / (s[:, None, None] * s[None, :, None] * s[None, None, :])
    return vol.astype(xp.float32)


def unpack_sums(num, wgt, size: int):
    """Packed sums (..., n_packed) on the Hermitian half ball -> Friedel-complete cubes
    (..., n, n, n), complex128 / float64."""
    lead = num.shape[:-1]
    full_n = np.zeros((*lead, size, size, size), np.complex128)
    full_w = np.zeros((*lead, size, size, size), np.float64)
    for i in np.ndindex(*lead):
        full_n[i], full_w[i] = hermitian_unpack(num[i], wgt[i], size)
    return full_n, full_w


def symmetrize_sums(num, wgt, sym_mats):
    """Friedel-complete sums summed over the point group (unchanged for C1)."""
    if len(sym_mats) > 1:  # odd, Friedel-complete cubes (unpack_sums): one gather for both
        num, wgt = symmetrize_fourier_sums(num, wgt, sym_mats)
    return num, wgt


def add_centered(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a + b for stacks of centred odd cubes (..., n, n, n) of possibly different n."""
    if a.shape[-1] < b.shape[-1]:
        a, b = b, a
    out = a.copy()
    o = (a.shape[-1] - b.shape[-1]) // 2
    sl = slice(o, o + b.shape[-1])
    out[..., sl, sl, sl] += b
    return out


def half_maps(
    num, wgt, box: int, sym_mats, mask_vol, fudge: float, join_px: float = 0.0, join_fsc=None
):
    """Half-maps (2, D, D, D) and the masked half-set FSC from one class's sums
    (2, n, n, n) per half-set.

    The FSC comes from lightly regularised maps (phase-randomisation corrected for the
    mask); its SNR then drives the Wiener filter of the returned maps. (The FSC of the
    Wiener-filtered maps is not used: where the filter suppresses a shell, the mask
    leaks the shared low-resolution signal into it.)

    join_px: below this radius (box pixels) both returned maps are the full-data map
    (both half-sets' sums, Wiener-filtered with the full-data SNR 2 FSC / (1 - FSC)),
    as RELION's auto-refine joins the halves below 40 A; above it each half's own."""
    filled = [symmetrize_sums(num[h], wgt[h], sym_mats) for h in (0, 1)]
    raw = [wiener_volume(n_h, w_h, box, PAD, None) for n_h, w_h in filled]
    curve = masked_fsc_corrected(raw[0], raw[1], mask_vol)
    snr = snr_from_fsc(curve, fudge)
    est = [wiener_fourier(n_h, w_h, box, PAD, snr) for n_h, w_h in filled]
    if join_fsc is not None:  # EXPERIMENT: up to where the FSC first drops below join_fsc
        below = np.flatnonzero(curve[1:] < join_fsc)
        join_px = max(join_px, float(below[0] + 1) if len(below) else float(box))
    if join_px > 0:
        full, rho = wiener_fourier(
            filled[0][0] + filled[1][0], filled[0][1] + filled[1][1], box, PAD, 2.0 * snr
        )
        low = rho < join_px
        est = [(np.where(low, full, f_h), rho) for f_h, _ in est]
    maps = np.stack([fourier_to_volume(f_h, rho, box, PAD) for f_h, rho in est])
    return maps, curve


def hard_maps(num, wgt, box: int, sym_mats, fudge: float, fsc_curves=None) -> np.ndarray:
    """Maps (K, D, D, D) from the hard-assignment sums (K, n, n, n) (both half-sets together).

    Wiener-filtered with the full-data SNR, 2 FSC / (1 - FSC), from the last
    iteration's half-set FSC of each class (``fsc_curves``); without it, a small
    constant regulariser (no filter).
    """
    out = []
    for k in range(num.shape[0]):
        n_k, w_k = symmetrize_sums(num[k], wgt[k], sym_mats)
        snr = None
        if fsc_curves is not None and np.any(fsc_curves[k]):
            snr = 2.0 * snr_from_fsc(fsc_curves[k], fudge)  # both halves together
        out.append(wiener_volume(n_k, w_k, box, PAD, snr))
    return np.stack(out)
