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


MIN_GROUP_SAMPLE = 10
"""A group with fewer particles in init's image sample starts from the pooled spectrum."""


def group_shell_power(spectra: np.ndarray, box: int, group: np.ndarray, n_groups: int):
    """Initial noise spectrum per optics group, (n_groups, D//2+1): :func:`image_shell_power`
    of each group's spectra (``group`` (n,) positions 0..G-1); a group with fewer than
    MIN_GROUP_SAMPLE particles gets the pooled spectrum."""
    pooled = image_shell_power(spectra, box)
    out = np.tile(pooled, (n_groups, 1))
    for g in range(n_groups):
        mine = np.asarray(group) == g
        if mine.sum() >= MIN_GROUP_SAMPLE:
            out[g] = image_shell_power(spectra[mine], box)
    return out


def particle_sigma2(model: dict, group: np.ndarray | None) -> np.ndarray:
    """The noise spectrum each particle is weighted with: the pooled ``sigma2`` (shells,)
    when the model has no per-group spectra or ``group`` is None, else its group's
    spectrum, (n, shells) float32 (``group`` (n,) positions 0..G-1)."""
    if group is None or "sigma2_groups" not in model:
        return np.asarray(model["sigma2"], dtype=np.float32)
    return np.asarray(model["sigma2_groups"], dtype=np.float32)[np.asarray(group, np.int64)]


def group_residual_power(y_centred, model, shells, n_shells: int, group, n_groups: int):
    """:func:`residual_power` per optics group: (power, count), (n_groups, n_shells) each,
    for particles of group positions ``group`` (n,) (host array)."""
    power = np.zeros((n_groups, n_shells))
    count = np.zeros((n_groups, n_shells))
    group = np.asarray(group)
    xp = get_xp(y_centred)
    for g in np.unique(group):
        rows = xp.asarray(np.flatnonzero(group == g))
        power[g], count[g] = residual_power(y_centred[rows], model[rows], shells, n_shells)
    return power, count


def updated_group_spectra(power, count, previous) -> np.ndarray:
    """:func:`updated_spectrum` per optics group: (G, shells) from (G, shells) sums."""
    return np.stack(
        [updated_spectrum(p, c, prev) for p, c, prev in zip(power, count, previous, strict=True)]
    )
