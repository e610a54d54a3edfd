"""How the classes start and keep their names: initial models that carry no class
information (K copies of one map, or maps that differ only by noise), and one
labelling of the classes across the two half-sets.

From K identical references every class scores every particle the same, and the
soft posteriors keep the maps identical for ever; the symmetry is broken as RELION
does for K > 1 from one reference: iteration 1 assigns each particle to a random
class, and the classes grow apart from their random subsets.

The two half-sets are refined independently (gold standard), so nothing ties half
A's class 1 to half B's class 1: from a random start each half separates the
states on its own, often with the labels swapped (measured: 91% of each half right,
50% overall, ``bench/RESULTS.md`` section 9). :func:`half_set_label_match` pairs
each half A class with the half B class whose map deviates from the class mean in
the same way; ``steps.reconstruct`` puts half B's classes in that order once per
iteration, before the FSC, and relabels half B's particles to match.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from hetrefine.alignment import SearchSettings, search_poses
from hetrefine.classification import fit_score, random_assignment
from hetrefine.fourier import centered_grid_radius, lowpass_volume, shell_average
from hetrefine.fsc import fsc
from hetrefine.likelihood import fit_terms_at_poses
from hetrefine.projection import PAD, prepare_reference
from hetrefine.sampling import rotation_grid

SAME_MAP_FSC = 0.97
"""Two initial models whose FSC stays above this at every shell up to the initial
low-pass where both hold density (:data:`CONTENT_POWER`) carry no class information
for one another. Measured at AdK's 14 A start: two maps reconstructed from random
halves of adk2_snr005 (low-passed to 30 A), lowest FSC 0.988; the open and closed
truth maps 0.42, the three states of adk3 0.59-0.78."""

CONTENT_POWER = 1e-4
"""A shell holds density when its mean power is at least this fraction of shell 1's:
shells a map was low-passed away from (a 30 A ab-initio map compared at 14 A) hold
round-off, whose FSC says nothing (0.10 between two such maps)."""


def _shell_power(vol: np.ndarray) -> np.ndarray:
    """Mean power per integer shell 0..D//2 of a (D, D, D) map."""
    n = vol.shape[0]
    power = np.abs(np.fft.fftshift(np.fft.fftn(np.asarray(vol, np.float64)))) ** 2
    shells = np.rint(centered_grid_radius((n, n, n))).astype(np.int64)
    return shell_average(power, shells, n // 2 + 1)


COPY_FSC = 0.999
"""The FSC above which two maps are copies of one map (up to grey scale and
resampling): with ``same_map_fsc: 1`` only such maps are grouped."""


def same_map_pairs(
    maps: np.ndarray, radius_px: float, threshold: float = SAME_MAP_FSC
) -> list[tuple[int, int, float]]:
    """Pairs (i, j, lowest FSC) of volumes (K, D, D, D) whose FSC stays at or above
    ``threshold`` (config ``same_map_fsc``; at most :data:`COPY_FSC`) in every shell
    1..``radius_px`` where both hold density (:data:`CONTENT_POWER`; their grey scales
    do not matter)."""
    threshold = min(float(threshold), COPY_FSC)
    out = []
    top = max(1, int(np.floor(radius_px)))
    held = []
    for v in maps:
        p = _shell_power(v)[: top + 1]
        held.append(p >= CONTENT_POWER * max(p[1], 1e-300))
    for i in range(len(maps)):
        for j in range(i + 1, len(maps)):
            both = held[i] & held[j]
            both[0] = True
            last = max(1, int(np.argmin(np.append(both, False))) - 1)  # contiguous from 1
            low = float(np.min(fsc(maps[i], maps[j])[1 : last + 1]))
            if low >= threshold:
                out.append((i, j, low))
    return out


def same_map_groups(n_classes: int, pairs: list[tuple[int, int, float]]) -> list[list[int]]:
    """Groups (two or more classes each, sorted) of references that are the same map:
    the connected components of ``pairs``."""
    parent = list(range(n_classes))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i, j, _ in pairs:
        parent[root(j)] = root(i)
    groups: dict[int, list[int]] = {}
    for i in range(n_classes):
        groups.setdefault(root(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def split_same_map_groups(
    posterior: np.ndarray,
    groups: list[list[int]],
    index: np.ndarray,
    seed: int,
    fit: np.ndarray | None = None,
    cuts: list[list[float]] | None = None,
) -> np.ndarray:
    """Iteration 1's posteriors (n, K) with the symmetry broken: the mass a particle
    gives to a group of identical references goes to one member of the group, drawn at
    random (seeded by the particle's index, so independent of the sharding). With one
    group of all K classes this is RELION's random subsets: a random class per particle.

    With ``fit`` (n, G), each particle's fit score to group g's map, the member is
    chosen by it instead: the group's first class takes the particles the map explains
    best, its last the worst, between the ascending ``cuts[g]`` (len(g) - 1 values;
    None: the quantiles of ``fit`` itself)."""
    out = np.array(posterior, np.float32, copy=True)
    for gi, g in enumerate(groups):
        if fit is None:
            pick = random_assignment(index, len(g), 1, seed).argmax(axis=1)
        else:
            f = np.nan_to_num(np.asarray(fit[:, gi], np.float64), nan=-np.inf)
            c = (
                np.quantile(f, np.arange(1, len(g)) / len(g))
                if cuts is None
                else np.asarray(cuts[gi], np.float64)
            )
            pick = len(g) - 1 - np.searchsorted(c, f, side="right")
        total = out[:, g].sum(axis=1)
        out[:, g] = 0.0
        out[np.arange(len(out)), np.asarray(g)[pick]] = total
    return out


def half_set_label_match(
    maps: np.ndarray, mask: np.ndarray | None = None, radius_px: float | None = None
) -> np.ndarray:
    """``order[k]``: the half B class that is half A's class k. ``maps`` (K, 2, D, D, D).

    Each half's class maps are taken relative to that half's mean over classes (what
    tells the classes apart, not the shared structure), low-passed to ``radius_px`` (box
    pixels; the resolution the classes are told apart at, where the deviations hold the
    states rather than each half's own noise) and masked; the pairing maximises the
    summed correlation of these deviations (Hungarian assignment). Identity when the
    halves already agree, and for K = 1."""
    k = maps.shape[0]
    if k < 2:
        return np.arange(k)
    w = 1.0 if mask is None else mask
    dev = []
    for h in (0, 1):
        d = (maps[:, h] - maps[:, h].mean(axis=0, keepdims=True)).astype(np.float64)
        if radius_px is not None:
            d = np.stack([lowpass_volume(v, v.shape[0] / radius_px, 1.0) for v in d])
        dev.append((d * w).reshape(k, -1))
    norms = [np.linalg.norm(d, axis=1) for d in dev]
    if min(n.min() for n in norms) <= 1e-12 * max(n.max() for n in norms) + 1e-300:
        return np.arange(k)  # some class is the mean of its half: nothing to match yet
    corr = (dev[0] @ dev[1].T) / (norms[0][:, None] * norms[1][None, :])
    rows, cols = linear_sum_assignment(-corr)
    if corr[rows, cols].sum() <= np.trace(corr) + 1e-6:
        return np.arange(k)  # the halves agree (or nothing tells the classes apart yet)
    order = np.empty(k, int)
    order[rows] = cols
    return order


def fit_to_group_maps(spectra, ctf, sigma2, search, grids, res, groups) -> np.ndarray:
    """(n, G): each particle's fit score (``classification.fit_score``) to each same-map
    group's map (its first class's reference in ``grids``) at its best pose there
    (``res``: the pose search's result)."""
    out = np.zeros((spectra.shape[0], len(groups)), np.float32)
    rows = np.arange(spectra.shape[0])
    for gi, g in enumerate(groups):
        k = g[0]
        out[:, gi] = fit_score(
            *fit_terms_at_poses(
                spectra, ctf, sigma2, search, grids, np.full(len(rows), k),
                res.rots[rows, k], res.shifts[rows, k],
            )
        )  # fmt: skip
    return out


def same_map_fit_cuts(
    maps: np.ndarray,
    groups: list[list[int]],
    spectra,
    ctf,
    sigma2,
    mask: np.ndarray,
    settings,
    px: float,
    res_limit_px: float,
) -> list[list[float]]:
    """Per same-map group, the ``len(g) - 1`` cuts that split iteration 1's particles by
    their fit to the group's map (:func:`split_same_map_groups`): the quantiles of the fit
    scores of a sample of the stack (``spectra`` (n, D, D//2+1) of its images, ``ctf``
    (n, 8), ``sigma2`` per shell or (n, shells)), each aligned to the map (``maps`` (K, D,
    D, D) at ``px`` A/px, under the spherical ``mask``) as iteration 1 aligns (``settings``,
    at ``res_limit_px``). One set of cuts for every shard: the split does not depend on the
    sharding."""
    box = maps.shape[-1]
    search = SearchSettings.from_config(box, px, res_limit_px, settings)
    rots = rotation_grid(float(settings["coarse_angle_step_deg"]), str(settings["symmetry"]))
    grids = [prepare_reference((maps[g[0]] * mask).astype(np.float32), PAD) for g in groups]
    res = search_poses(spectra, ctf, sigma2, grids, rots, search)
    fit = fit_to_group_maps(
        spectra, ctf, sigma2, search, grids, res, [[i] for i in range(len(groups))]
    )
    cuts = []
    for gi, g in enumerate(groups):
        f = fit[:, gi][np.isfinite(fit[:, gi])]
        cuts.append(np.quantile(f, np.arange(1, len(g)) / len(g)).tolist() if len(f) else [])
    return cuts
