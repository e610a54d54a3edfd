"""The per-particle fit score (issue 18 item 5): standardised against the noise model,
it flags injected protein-like junk (another map's projections) among good particles
(its outputs: ``tests/test_export.py``)."""

from __future__ import annotations

import json

import mrcfile
import numpy as np
import pandas as pd
import pytest

from hetrefine.alignment import SearchSettings, search_poses
from hetrefine.classification import class_posteriors, fit_score, fit_score_flags
from hetrefine.fourier import rfft2_centered
from hetrefine.io.star import read_star_blocks
from hetrefine.likelihood import fit_terms_at_poses
from hetrefine.projection import prepare_reference
from hetrefine.sampling import rotation_grid
from hetrefine.simulate import SimulationSpec, phantoms, simulate_from_volumes

BOX, PX = 48, 4.0
THRESHOLD = -3.0


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """240 particles: two classes of one phantom and 30% junk (noise, fragments and a
    different phantom of the same size and mass), scored against the true maps."""
    d = tmp_path_factory.mktemp("fit")
    spec = SimulationSpec(
        n_particles=240, n_classes=2, box=BOX, pixel_size=PX, snr=0.3, junk_fraction=0.3, seed=3
    )
    vols = phantoms(spec)
    other = phantoms(SimulationSpec(n_classes=1, box=BOX, pixel_size=PX, seed=11))[0]
    simulate_from_volumes(spec, d, vols, other)
    noise_sd = json.loads((d / "spec.json").read_text())["noise_sd"]
    truth = pd.read_csv(d / "truth.csv")
    parts = read_star_blocks(d / "particles.star")["particles"]
    images = mrcfile.read(d / "particles.mrcs").astype(np.float32)
    ctf = np.zeros((len(parts), 8), np.float32)
    ctf[:, 0], ctf[:, 1] = parts["rlnDefocusU"], parts["rlnDefocusV"]
    ctf[:, 2], ctf[:, 3], ctf[:, 4], ctf[:, 5] = parts["rlnDefocusAngle"], 300.0, 2.7, 0.1
    sigma2 = np.full(BOX // 2 + 1, noise_sd**2, np.float32)  # white noise, unitary FFT
    st = SearchSettings(box=BOX, pixel_size=PX, res_limit_px=BOX / 2 - 2, levels=2)
    grids = [prepare_reference(v, 2) for v in vols]
    spectra = rfft2_centered(images)
    res = search_poses(spectra, ctf, sigma2, grids, rotation_grid(15.0, "C1"), st)
    best = class_posteriors(res.coarse_evidence, np.full(2, 0.5), 1.0).argmax(1)
    n = np.arange(len(best))
    terms = fit_terms_at_poses(
        spectra, ctf, sigma2, st, grids, best, res.rots[n, best], res.shifts[n, best]
    )
    return fit_score(*terms), truth, ctf


def test_good_particles_score_standard_normal(scored):
    z, truth, ctf = scored
    good = truth["class"].to_numpy() > 0
    assert abs(np.median(z[good])) < 0.4
    assert 0.75 < np.std(z[good]) < 1.3
    # comparable across defocus: the score does not follow it
    assert abs(np.corrcoef(z[good], ctf[good, 0])[0, 1]) < 0.3


def test_threshold_flags_protein_like_junk(scored):
    z, truth, _ = scored
    flagged = fit_score_flags(z, THRESHOLD)
    kind = truth["junk_kind"].fillna("").to_numpy()
    good = truth["class"].to_numpy() > 0
    other = kind == "other"
    assert other.sum() >= 15
    assert flagged[other].mean() >= 0.8, np.sort(z[other])
    assert flagged[~good].mean() >= 0.9
    assert flagged[good].sum() <= 0.01 * good.sum() + 1, np.sort(z[good])[:5]


def test_flags_without_threshold_and_nan():
    z = np.array([-10.0, np.nan, 0.5])
    assert not fit_score_flags(z, None).any()
    np.testing.assert_array_equal(fit_score_flags(z, -2.0), [True, False, False])
