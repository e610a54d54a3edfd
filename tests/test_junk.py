"""Junk by fit score (issue 18's junk target): each class's fit scores centred on its
own median particle (``hetrefine.junk``), scored against the other half-set's map, so
that one ``junk_fit_score`` threshold flags protein-like junk in any class."""

from __future__ import annotations

import glob

import numpy as np
import pandas as pd
import pytest

from hetrefine.classification import calibrated_posteriors, half_b_order, relabel_half_b
from hetrefine.config import defaults
from hetrefine.io.run_files import assemble_assignments, read_model
from hetrefine.io.star import read_star_blocks
from hetrefine.junk import centred, centred_assignments, class_centres
from hetrefine.pipeline import run_pipeline
from hetrefine.simulate import SimulationSpec, phantoms, simulate_from_volumes


def test_class_centres_are_each_class_median_of_finite_scores():
    score = np.array([1.0, 3.0, 2.0, np.nan, -5.0, -1.0, -3.0])
    classes = np.array([0, 0, 0, 0, 1, 1, 1])
    assert class_centres(score, classes, 3) == [2.0, -3.0, 0.0]  # class 2 empty: 0


def test_centred_subtracts_the_particles_class_centre():
    got = centred(np.array([1.0, -2.0, np.nan, 4.0]), np.array([0, 1, 1, 5]), [0.5, -1.0])
    np.testing.assert_allclose(got[[0, 1, 3]], [0.5, -1.0, 4.0])  # class 5: no centre
    assert np.isnan(got[2]) and got.dtype == np.float32


def test_centred_assignments_uses_the_hard_class_and_leaves_the_input():
    post = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    a = {"posterior": post, "fit_score": np.array([1.0, 1.0, -1.0], np.float32)}
    out = centred_assignments(a, {"fit_score_centre": [0.5, 2.0]})
    np.testing.assert_allclose(out["fit_score"], [0.5, -1.0, -1.5])
    np.testing.assert_allclose(a["fit_score"], [1.0, 1.0, -1.0])  # unchanged
    # a model from before the centring: the scores as they are
    assert centred_assignments(a, {})["fit_score"] is a["fit_score"]


@pytest.mark.slow
def test_threshold_flags_injected_protein_like_junk(tmp_path):
    """600 particles, two states and 20% junk (noise, fragments and a different protein
    of the same size): with junk_fit_score -2.5 and no decoy class, most of the junk and
    most of the other protein are flagged while almost no good particle is."""
    spec = SimulationSpec(
        n_particles=600, n_classes=2, box=40, pixel_size=4.0, snr=0.3, junk_fraction=0.2,
        domain_fraction=0.2, seed=4,
    )  # fmt: skip
    vols = phantoms(spec)
    other = phantoms(SimulationSpec(n_classes=1, box=40, pixel_size=4.0, seed=11))[0]
    simulate_from_volumes(spec, tmp_path / "data", vols, other)
    cfg = defaults()
    cfg.update(iterations=4, shard_size=300, junk_fit_score=-2.5)
    models = sorted(glob.glob(str(tmp_path / "data" / "initial_model_*.mrc")))
    paths = run_pipeline(
        str(tmp_path / "data" / "particles.star"), models, str(tmp_path / "run"), cfg
    )
    star = read_star_blocks(tmp_path / "run" / "particles_all.star")["particles"]
    # the exported posteriors are the engine's, calibrated; the classes are its argmax
    last = read_model(paths.model(4))
    engine = relabel_half_b(
        assemble_assignments(paths.all_assignments(4), len(star)), half_b_order(last)
    )["posterior"]
    np.testing.assert_allclose(
        star["rlnMaxValueProbDistribution"], calibrated_posteriors(engine).max(1), rtol=1e-5
    )
    np.testing.assert_array_equal(star["rlnClassNumber"], engine.argmax(1) + 1)
    truth = pd.read_csv(tmp_path / "data" / "truth.csv")
    junk = truth["class"].to_numpy() == 0
    other_protein = (truth["junk_kind"] == "other").to_numpy()
    flagged = star["hrJunkByFitScore"].to_numpy(int) == 1
    score = star["hrFitScore"].to_numpy(float)
    print(
        f"\njunk flagged {flagged[junk].mean():.3f}, other protein "
        f"{flagged[other_protein].mean():.3f}, good lost {flagged[~junk].mean():.4f}, "
        f"good median {np.median(score[~junk]):.2f}"
    )
    assert flagged[junk].mean() >= 0.8  # uncentred, against its own half-map: 0.66
    assert flagged[other_protein].mean() >= 0.5  # scored against its own half-map: 0.02
    assert flagged[~junk].mean() <= 0.02
    # the exported scores are centred: each class's median particle at 0
    cls = star["rlnClassNumber"].to_numpy(int)
    for k in (1, 2):
        assert abs(np.median(score[cls == k])) < 0.05, k
    mdl = sorted(glob.glob(str(tmp_path / "run" / "iter_*" / "model.json")))
    assert mdl and len(read_model(mdl[-1])["fit_score_centre"]) == 2
