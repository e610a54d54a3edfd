"""Calibrated class posteriors (issue 18 item 5): a particle's own image in its class's
reference inflates that class's evidence; measured between the half-sets and taken out,
the expected number of misclassified particles (sum of 1 - max posterior) matches the
observed one."""

from __future__ import annotations

import numpy as np

from hetrefine.classification import (
    POSTERIOR_TEMPERATURE,
    calibrated_posteriors,
    class_posteriors,
    self_evidence,
    without_self_evidence,
)

SELF = 3.0  # nats a particle gains from itself in its class's reference


def _evidence(n: int, rng):
    """Exact two-class log-likelihood ratios (calibrated by construction): for a particle
    of class c, L ~ N(m, 2m) with m its information; evidence (n, 2) with L on c."""
    label = rng.integers(0, 2, n)
    m = rng.uniform(0.5, 12.0, n)
    llr = rng.normal(m, np.sqrt(2 * m))
    ev = np.zeros((n, 2))
    ev[np.arange(n), label] = llr
    return ev, label


def _expected_observed(ev, label, prior):
    p = class_posteriors(ev, prior, 1.0)
    return float((1 - p.max(1)).sum()), int((p.argmax(1) != label).sum())


def test_self_evidence_measured_and_removed():
    rng = np.random.default_rng(0)
    n = 8000
    ev, label = _evidence(n, rng)
    prior = np.full(2, 0.5)
    # each particle sits in each class's reference with its (calibrated) posterior weight
    own = ev + SELF * class_posteriors(ev, prior, 1.0)
    exp0, obs0 = _expected_observed(own, label, prior)
    assert obs0 > 1.5 * exp0  # over-confident: the effect to remove
    # a quarter of the particles also scored against the other half-set's maps (which
    # differ from this half-set's by their own noise, common to every particle)
    sample = np.arange(0, n, 4)
    other = ev[sample] + rng.normal(0, 0.5, (1, 2))
    s_ev = self_evidence(own, sample, other, prior, 1.0)
    np.testing.assert_allclose(s_ev, SELF, atol=0.6)
    fixed = without_self_evidence(own, s_ev, prior, 1.0)
    exp1, obs1 = _expected_observed(fixed, label, prior)
    assert obs1 <= obs0  # accuracy not lost
    assert 1 / 1.25 < exp1 / obs1 < 1.25, (exp1, obs1)


def test_no_self_evidence_when_the_halves_agree():
    rng = np.random.default_rng(1)
    ev, _ = _evidence(2000, rng)
    sample = np.arange(0, 2000, 4)
    s_ev = self_evidence(ev, sample, ev[sample], np.full(2, 0.5), 1.0)
    np.testing.assert_array_equal(s_ev, 0.0)
    np.testing.assert_array_equal(without_self_evidence(ev, s_ev, np.full(2, 0.5), 1.0), ev)


def test_calibrated_posteriors_keep_the_class_and_soften_by_the_temperature():
    rng = np.random.default_rng(2)
    p = class_posteriors(rng.normal(0, 4, (500, 3)), np.full(3, 1 / 3), 1.0)
    q = calibrated_posteriors(p)
    np.testing.assert_array_equal(q.argmax(1), p.argmax(1))
    np.testing.assert_allclose(q.sum(1), 1.0, rtol=1e-6)
    assert (q.max(1) <= p.max(1) + 1e-6).all() and (q.max(1) < p.max(1) - 1e-3).any()
    np.testing.assert_allclose(calibrated_posteriors(p, 1.0), p, rtol=1e-5, atol=1e-7)
    # a float32 rounding apart: tempered and cast back to float32 they would tie and
    # the class would flip to the lower one
    near = np.array([[np.nextafter(np.float32(0.5), np.float32(0)), 0.5]], np.float32)
    assert calibrated_posteriors(near).argmax(1)[0] == 1
    one_hot = np.eye(3, dtype=np.float32)[[0, 2, 1]]
    np.testing.assert_array_equal(calibrated_posteriors(one_hot), one_hot)


def test_temperature_undoes_a_sharpening_by_the_same_factor():
    """Evidence scaled by 1.5 (what the engine's self-inclusion does to the issue 18
    sets, measured) is over-confident; tempered by POSTERIOR_TEMPERATURE the expected
    and observed errors agree again, with the same classes."""
    rng = np.random.default_rng(3)
    ev, label = _evidence(8000, rng)
    prior = np.full(2, 0.5)
    sharp = class_posteriors(POSTERIOR_TEMPERATURE * ev, prior, 1.0)
    observed = int((sharp.argmax(1) != label).sum())
    assert observed > 1.4 * float((1 - sharp.max(1)).sum())
    fixed = calibrated_posteriors(sharp)
    assert int((fixed.argmax(1) != label).sum()) == observed
    assert 1 / 1.25 < float((1 - fixed.max(1)).sum()) / observed < 1.25


def test_reported_assignments_calibrate_unless_the_engine_corrected(tmp_path):
    """The outputs' posteriors: half B relabelled, then tempered; as they are when
    ``self_evidence_correction`` already took the self-evidence out in the engine."""
    from hetrefine.export import reported_assignments
    from hetrefine.io import run_files

    n, k = 6, 2
    post = np.array([[0.99, 0.01], [0.7, 0.3], [0.2, 0.8]] * 2, np.float32)
    half = np.array([0, 0, 0, 1, 1, 1], np.int8)
    run_files.write_assignments(
        tmp_path / "shard.npz", index=np.arange(n), half=half, posterior=post,
        euler=np.zeros((n, k, 3), np.float32), shift=np.zeros((n, k, 2), np.float32),
        loglik=np.zeros((n, k), np.float32), pose_peak=np.ones((n, k), np.float32),
    )  # fmt: skip
    model = {"half_b_order": [1, 0]}  # half B's classes were swapped by reconstruct
    raw = reported_assignments([tmp_path / "shard.npz"], n, model, self_evidence_corrected=True)
    expect = post.copy()
    expect[3:] = post[3:, ::-1]
    np.testing.assert_allclose(raw["posterior"], expect)
    got = reported_assignments([tmp_path / "shard.npz"], n, model)
    np.testing.assert_allclose(got["posterior"], calibrated_posteriors(expect), rtol=1e-6)
    np.testing.assert_array_equal(got["posterior"].argmax(1), expect.argmax(1))
