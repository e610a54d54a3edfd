"""Reconstruction from backprojected sums: Wiener filter, gridding correction.

Inputs are the numerator sum_i CTF_i * Y_i / sigma2 and the weight
sum_i CTF_i^2 / sigma2 accumulated by ``projection.backproject`` on an odd
Fourier cube (half-plane slices; :func:`projection.hermitian_complete` adds
the Friedel mates). The map estimate per frequency is

    V(k) = num(k) / (wgt(k) + mean_shell(wgt)(k) / (tau2_fudge * SNR(k)))

with SNR(k) = FSC(k) / (1 - FSC(k)) from the half-set FSC (the half-map SNR),
as in RELION's tau2 regularisation. Then an inverse FFT on the padded box,
a crop to the box, and division by the trilinear kernel's transform.
"""

from __future__ import annotations

import numpy as np

from hetrefine.backend import get_fft, get_xp
from hetrefine.fourier import centered_grid_radius
from hetrefine.projection import sinc2_profile


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
    full = xp.zeros((size, size, size), dtype=xp.complex128)
    c = size // 2
    lo, hi = max(c - half, 0), min(c + half + 1, size)
    o = lo - (c - half)
    full[lo:hi, lo:hi, lo:hi] = vol_f[o : o + hi - lo, o : o + hi - lo, o : o + hi - lo]
    real = xp.fft.fftshift(fft.ifftn(xp.fft.ifftshift(full))).real * box
    b0 = c - box // 2
    vol = real[b0 : b0 + box, b0 : b0 + box, b0 : b0 + box]
    s = sinc2_profile(box, pad, xp)
    vol = vol / (s[:, None, None] * s[None, :, None] * s[None, None, :])
    return vol.astype(xp.float32)
