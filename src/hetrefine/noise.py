"""The noise model: power per Fourier shell (sigma2) of the particles' noise.

Initial estimate: the mean power per shell of (normalised) particle images,
which at the SNRs of cryo-EM is almost all noise. Each iteration then measures
the residual power |Y - a C A|^2 of every particle at its best pose in its
class (the align step, per shard) and the reconstruct step averages them.
"""

from __future__ import annotations

import numpy as np

from hetrefine.backend import get_xp, to_host
from hetrefine.fourier import radial_shells, shell_average

FLOOR = 1e-3
"""No shell's noise power goes below this fraction of the mean over shells 1..."""


def floored(sigma2: np.ndarray) -> np.ndarray:
    """``sigma2`` with every shell at least FLOOR x the mean of shells 1.."""
    sigma2 = np.asarray(sigma2, dtype=np.float64)
    return np.maximum(sigma2, FLOOR * float(np.mean(sigma2[1:])))


def image_shell_power(spectra: np.ndarray, box: int) -> np.ndarray:
    """Mean |F|^2 per integer shell 0..D//2 of rfft spectra (n, D, D//2+1): the
    initial noise spectrum (floored)."""
    shells = radial_shells(box)
    p = (np.abs(spectra) ** 2).mean(axis=0)
    sigma2 = shell_average(p, shells, box // 2 + 1)
    return np.maximum(sigma2, FLOOR * sigma2[1:].mean())


def residual_power(y_centred, model, shells, n_shells: int):
    """(power, count) per shell (n_shells,) of the residuals ``y_centred - model`` (n, m),
    summed over the particles, for frequencies of integer shell ``shells`` (m,)."""
    xp = get_xp(y_centred)
    resid = xp.abs(y_centred - model) ** 2
    power = to_host(xp.bincount(shells, weights=resid.sum(axis=0), minlength=n_shells))[:n_shells]
    count = to_host(xp.bincount(shells, minlength=n_shells))[:n_shells] * len(y_centred)
    return power, count


def updated_spectrum(power, count, previous) -> np.ndarray:
    """The noise spectrum from summed residual ``power`` and ``count`` per shell; shells
    with no count keep the ``previous`` value; floored."""
    previous = np.asarray(previous)
    sigma2 = np.where(np.asarray(count) > 0, power / np.maximum(count, 1), previous)
    return floored(sigma2)
