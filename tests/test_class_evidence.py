"""Class evidence gated between the coarse grid's and the final local level's: it
classifies two close states better than the coarse grid where the pose posterior is
peaked, equals the coarse evidence where a class's map is unresolved and where the pose
posterior is a delta (given poses)."""

from __future__ import annotations

import numpy as np

from hetrefine.alignment import SearchSettings, search_around_given_poses, search_poses
from hetrefine.classification import gated_class_evidence
from hetrefine.ctf import compute_ctf
from hetrefine.fourier import half_plane_indices
from hetrefine.projection import phase_shifts, prepare_reference, project
from hetrefine.rotations import random_rotations
from hetrefine.sampling import so3_grid
from hetrefine.steps.align import class_evidence

BOX, PX, STEP = 32, 3.0, 30.0


def _blobs(centres, width=2.0):
    g = np.arange(BOX) - BOX / 2
    z, y, x = np.meshgrid(g, g, g, indexing="ij")
    v = np.zeros((BOX,) * 3, np.float32)
    for c in centres:
        v += np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * width**2))
    return v


def _close_states(n=200, seed=0, move=3.0, amp=1.0):
    """Two states of 12 Gaussian blobs (height ``amp``), two blobs moved by ``move`` px
    in the second;
    ``n`` particles alternating between them, random views, shifts within 1 px, CTF,
    white noise of power 1 per coefficient. Returns spectra (n, D, D//2+1), CTF
    parameters, the references' grids, the labels, the true rotations and shifts."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-7, 7, (12, 3))
    moved = centres.copy()
    moved[0, 0] += move
    moved[1, 1] -= move
    grids = [prepare_reference(amp * _blobs(c), 2) for c in (centres, moved)]
    label = np.arange(n) % 2
    rots = random_rotations(n, rng)
    shifts = rng.uniform(-1, 1, (n, 2)).astype(np.float32)
    ctf = np.zeros((n, 8), np.float32)
    ctf[:, 0] = ctf[:, 1] = rng.uniform(10000, 20000, n)
    ctf[:, 3], ctf[:, 4], ctf[:, 5] = 300, 2.7, 0.1
    flat, kx, ky = half_plane_indices(BOX, BOX / 2, np, include_dc=True)
    c = compute_ctf(ctf, kx / (BOX * PX), ky / (BOX * PX))
    y = np.zeros((n, BOX * (BOX // 2 + 1)), np.complex64)
    for k in (0, 1):
        m = label == k
        a = project(grids[k], rots[m].astype(np.float32), kx, ky, 2)
        y[np.ix_(m, flat)] = phase_shifts(kx, ky, shifts[m], BOX) * c[m] * a
    noise = rng.normal(size=(n, len(flat))) + 1j * rng.normal(size=(n, len(flat)))
    y[:, flat] += (noise / np.sqrt(2)).astype(np.complex64)
    return y.reshape(n, BOX, BOX // 2 + 1), ctf, grids, label, rots, shifts


def _settings(levels=2):
    return SearchSettings(
        box=BOX, pixel_size=PX, res_limit_px=12, coarse_step_deg=STEP, levels=levels,
        shift_range_px=1, shift_step_px=1,
    )  # fmt: skip


def _accuracy(ev, label):
    return float(np.mean(ev.argmax(1) == label))


def test_gated_evidence_classifies_close_states_better_than_the_coarse_grid():
    """Peaked pose posteriors (the coarse share near 1): the coarse grid's evidence
    depends on how near each class's nearest grid pose falls and misclassifies a quarter
    of the particles; the gate takes the final level's evidence and recovers the labels."""
    spectra, ctf, grids, label, _, _ = _close_states()
    sigma2 = np.ones(BOX // 2 + 1, np.float32)
    res = search_poses(spectra, ctf, sigma2, grids, so3_grid(STEP).astype(np.float32), _settings())
    assert np.median(res.coarse_peak) > 0.9  # the pose posterior is within one coarse cell
    considered = np.ones(res.coarse_evidence.shape, bool)
    ev, w = gated_class_evidence(
        res.coarse_evidence, res.fine_evidence, res.coarse_peak, considered, 0.5
    )
    acc_coarse, acc_gated = _accuracy(res.coarse_evidence, label), _accuracy(ev, label)
    assert acc_gated >= 0.9, (acc_coarse, acc_gated)
    assert acc_gated >= acc_coarse + 0.1, (acc_coarse, acc_gated)
    assert w.mean() > 0.9
    # the step's switch: coarse is the coarse evidence itself, gated the same as above
    cfg = {"class_evidence": "coarse", "class_evidence_full_share": 0.5}
    assert class_evidence(res, cfg, lambda e: considered) is res.coarse_evidence
    cfg["class_evidence"] = "gated"
    assert np.array_equal(class_evidence(res, cfg, lambda e: considered, np.ones(2, bool)), ev)
    # a class whose map does not resolve the final level's shells: no fine evidence
    ev_u, w_u = gated_class_evidence(
        res.coarse_evidence, res.fine_evidence, res.coarse_peak, considered, 0.5,
        resolved=np.array([True, False]),
    )  # fmt: skip
    assert np.all(w_u == 0) and np.allclose(ev_u, res.coarse_evidence)


def test_broad_pose_posterior_keeps_the_coarse_evidence():
    """Weak signal (blobs at 1/20 of the height above): the coarse posterior is broad
    (its best pose holds a few percent), the final level gets little weight, and the
    gated evidence stays that close to the coarse one."""
    spectra, ctf, grids, _, _, _ = _close_states(n=100, seed=1, amp=0.05)
    sigma2 = np.ones(BOX // 2 + 1, np.float32)
    res = search_poses(spectra, ctf, sigma2, grids, so3_grid(STEP).astype(np.float32), _settings())
    assert np.median(res.coarse_peak) < 0.1
    ev, w = gated_class_evidence(
        res.coarse_evidence, res.fine_evidence, res.coarse_peak, np.ones((100, 2), bool), 0.5
    )
    assert w.mean() < 0.15
    gap = (ev - res.coarse_evidence) - w[:, None] * (res.fine_evidence - res.coarse_evidence)
    assert np.allclose(gap, 0.0)


def test_delta_pose_posterior_gated_equals_coarse():
    """Given poses (a delta pose posterior): the coarse share is 1 and the fine evidence
    is the evidence at the given pose, so every mode gives the same classes."""
    spectra, ctf, grids, label, rots, shifts = _close_states(n=40)
    sigma2 = np.ones(BOX // 2 + 1, np.float32)
    res = search_around_given_poses(
        spectra, ctf, sigma2, grids, rots, shifts, _settings(levels=0), refine=False
    )
    assert np.all(res.coarse_peak == 1)
    ev, w = gated_class_evidence(
        res.coarse_evidence, res.fine_evidence, res.coarse_peak, np.ones((40, 2), bool), 0.5
    )
    assert np.all(w == 1) and np.array_equal(ev, res.coarse_evidence)
    assert _accuracy(ev, label) >= 0.95  # true poses: the close states are told apart
