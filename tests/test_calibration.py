"""Calibrated class posteriors (issue 18 item 5): a particle's own image in its class's
reference inflates that class's evidence; measured between the half-sets and taken out,
the expected number of misclassified particles (sum of 1 - max posterior) matches the
observed one."""

from __future__ import annotations

import numpy as np

from hetrefine.classification import class_posteriors, self_evidence, without_self_evidence

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
