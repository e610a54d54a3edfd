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
    xp = get_xp(num)
    fft = get_fft(xp)
    n = num.shape[0]
    half = n // 2
    rho = centered_grid_radius((n, n, n), xp) / pad  # in box pixels
    shell = xp.rint(rho).astype(xp.int64)
    n_shells = box // 2 + 1
    in_range = shell < n_shells
    s_idx = xp.where(in_range, shell, n_shells - 1).ravel()
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
    vol_f = num / (wgt.real + reg)
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


def half_maps(num, wgt, box: int, sym_mats, mask_vol, fudge: float):
    """Half-maps (2, D, D, D) and the masked half-set FSC from one class's sums
    (2, n, n, n) per half-set.

    The FSC comes from lightly regularised maps (phase-randomisation corrected for the
    mask); its SNR then drives the Wiener filter of the returned maps. (The FSC of the
    Wiener-filtered maps is not used: where the filter suppresses a shell, the mask
    leaks the shared low-resolution signal into it.)"""
    filled = [symmetrize_sums(num[h], wgt[h], sym_mats) for h in (0, 1)]
    raw = [wiener_volume(n_h, w_h, box, PAD, None) for n_h, w_h in filled]
    curve = masked_fsc_corrected(raw[0], raw[1], mask_vol)
    snr = snr_from_fsc(curve, fudge)
    maps = np.stack([wiener_volume(n_h, w_h, box, PAD, snr) for n_h, w_h in filled])
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
