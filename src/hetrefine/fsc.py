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


def resolution_angstrom(
    curve: np.ndarray, box: int, pixel_size: float, threshold: float = 0.143
) -> float:
    """Resolution in Angstrom at ``threshold``: box * pixel / shell."""
    shell = max(resolution_shell(curve, threshold), 1e-6)
    return float(box * pixel_size / shell)


def shell_resolution_A(box: int, pixel_size: float) -> np.ndarray:
    """Resolution in Angstrom of each shell 0..D//2 (inf at DC)."""
    s = np.arange(box // 2 + 1, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(s > 0, box * pixel_size / np.maximum(s, 1e-12), np.inf)


def randomize_phases_beyond(vol, shell: float, seed: int = 0):
    """Copy of a (D, D, D) map with Fourier phases randomised beyond ``shell`` (pixels).

    The random phases are Hermitian-consistent (taken from the transform of real
    white noise), so the result is real.
    """
    xp = get_xp(vol)
    fft = get_fft(xp)
    box = vol.shape[0]
    f = fft.fftn(vol.astype(xp.float64))
    rng = np.random.default_rng(seed)
    noise = xp.asarray(rng.standard_normal(vol.shape))
    ph = fft.fftn(noise)
    ph = ph / xp.maximum(xp.abs(ph), 1e-30)
    r = xp.fft.ifftshift(centered_grid_radius((box,) * 3, xp))
    f = xp.where(r > shell, xp.abs(f) * ph, f)
    return fft.ifftn(f).real


def masked_fsc_corrected(map1, map2, mask, seed: int = 0) -> np.ndarray:
    """Masked FSC corrected for the mask's own correlation by phase randomisation.

    FSC_true = (FSC_masked - FSC_random) / (1 - FSC_random) beyond the shell where the
    unmasked FSC first falls below 0.8 (Chen et al. 2013, as RELION's postprocess).
    """
    unmasked = fsc(map1, map2)
    below = np.flatnonzero(unmasked[1:] < 0.8)
    shell = float(below[0] + 1) if len(below) else float(len(unmasked))
    masked = fsc(map1, map2, mask)
    if shell >= len(unmasked) - 1:
        return masked
    r1 = randomize_phases_beyond(map1, shell, seed)
    r2 = randomize_phases_beyond(map2, shell, seed + 1)
    rand = fsc(r1, r2, mask)
    out = masked.copy()
    s = np.arange(len(out))
    beyond = s > shell + 1
    denom = np.maximum(1.0 - rand[beyond], 1e-6)
    out[beyond] = (masked[beyond] - rand[beyond]) / denom
    return out


def fsc_crossing(curve: np.ndarray, box: int, pixel_size: float, threshold: float = 0.143) -> float:
    """Resolution (Angstrom) where the FSC (per shell 0..S-1) first drops below ``threshold``
    (:func:`resolution_angstrom`); NaN for fewer than 2 shells."""
    f = np.asarray(curve, dtype=np.float64)
    if f.size < 2:
        return float("nan")
    return resolution_angstrom(f, box, pixel_size, threshold)
