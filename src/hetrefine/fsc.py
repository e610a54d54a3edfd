"""Fourier shell correlation and resolution."""

from __future__ import annotations

import numpy as np

from hetrefine.backend import get_fft, get_xp, to_host
from hetrefine.fourier import centered_grid_radius


def fsc(map1, map2, mask=None) -> np.ndarray:
    """FSC of two (D, D, D) maps per integer shell 0..D//2, as a float64 numpy array.

    With ``mask``, both maps are multiplied by it first.
    """
    xp = get_xp(map1)
    fft = get_fft(xp)
    box = map1.shape[0]
    if mask is not None:
        map1, map2 = map1 * mask, map2 * mask
    f1 = xp.fft.fftshift(fft.fftn(map1.astype(xp.float64)))
    f2 = xp.fft.fftshift(fft.fftn(map2.astype(xp.float64)))
    shells = xp.rint(centered_grid_radius((box,) * 3, xp)).astype(xp.int64).ravel()
    n = box // 2 + 1
    ok = shells < n
    s = shells[ok]
    cross = xp.bincount(s, weights=(f1 * xp.conj(f2)).real.ravel()[ok], minlength=n)
    p1 = xp.bincount(s, weights=(xp.abs(f1) ** 2).ravel()[ok], minlength=n)
    p2 = xp.bincount(s, weights=(xp.abs(f2) ** 2).ravel()[ok], minlength=n)
    out = cross / xp.sqrt(xp.maximum(p1 * p2, 1e-300))
    return to_host(out).astype(np.float64)


def resolution_shell(curve: np.ndarray, threshold: float = 0.143) -> float:
    """The (fractional) shell where the FSC first falls below ``threshold``.

    Linear interpolation between the shells around the crossing; the last shell
    when it never falls below. Shell 0 (DC) is ignored.
    """
    c = np.asarray(curve, dtype=np.float64)
    for i in range(1, len(c)):
        if c[i] < threshold:
            lo, hi = c[i - 1], c[i]
            if i == 1 or lo == hi:
                return float(i - 1) if i > 1 else 1.0
            return float(i - 1 + (lo - threshold) / (lo - hi))
    return float(len(c) - 1)


def resolution_angstrom(curve: np.ndarray, box: int, pixel_size: float, threshold: float = 0.143) -> float:
    """Resolution in Angstrom at ``threshold``: box * pixel / shell."""
    shell = max(resolution_shell(curve, threshold), 1e-6)
    return float(box * pixel_size / shell)


def shell_resolution_A(box: int, pixel_size: float) -> np.ndarray:
    """Resolution in Angstrom of each shell 0..D//2 (inf at DC)."""
    s = np.arange(box // 2 + 1, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(s > 0, box * pixel_size / np.maximum(s, 1e-12), np.inf)
