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

from hetrefine.classification import random_assignment
from hetrefine.fourier import lowpass_volume
from hetrefine.fsc import fsc

SAME_MAP_FSC = 0.98
"""Two initial models whose FSC stays above this at every shell up to the initial
low-pass carry no class information for one another (two truth maps of AdK's open
and closed states, low-passed to 30 A: FSC 0.58 at the 30 A shell)."""


def same_map_pairs(maps: np.ndarray, radius_px: float) -> list[tuple[int, int, float]]:
    """Pairs (i, j, lowest FSC) of volumes (K, D, D, D) whose FSC stays at or above
    :data:`SAME_MAP_FSC` in every shell 1..``radius_px`` (their grey scales do not matter)."""
    out = []
    top = max(1, int(np.floor(radius_px)))
    for i in range(len(maps)):
        for j in range(i + 1, len(maps)):
            low = float(np.min(fsc(maps[i], maps[j])[1 : top + 1]))
            if low >= SAME_MAP_FSC:
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
    posterior: np.ndarray, groups: list[list[int]], index: np.ndarray, seed: int
) -> np.ndarray:
    """Iteration 1's posteriors (n, K) with the symmetry broken: the mass a particle
    gives to a group of identical references goes to one member of the group, drawn at
    random (seeded by the particle's index, so independent of the sharding). With one
    group of all K classes this is RELION's random subsets: a random class per particle."""
    out = np.array(posterior, np.float32, copy=True)
    for g in groups:
        pick = random_assignment(index, len(g), 1, seed).argmax(axis=1)
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
