"""Class posteriors, class-similarity annealing, online-EM batches."""

from __future__ import annotations

import numpy as np
import pytest

from hetrefine.classification import (
    anneal_similarity,
    class_posteriors,
    online_em_selection,
    posterior_entropy,
)


def test_posteriors_follow_evidence_and_prior():
    ev = np.array([[0.0, 2.0], [10.0, 0.0]])
    p = class_posteriors(ev, np.array([0.5, 0.5]), 1.0, 5, np.arange(2), {})
    assert p[0, 1] == pytest.approx(1 / (1 + np.exp(-2)), rel=1e-6)
    assert p[1].argmax() == 0 and np.allclose(p.sum(axis=1), 1)
    # a prior of 0.9 vs 0.1 shifts the log-odds by log 9
    q = class_posteriors(ev, np.array([0.9, 0.1]), 1.0, 5, np.arange(2), {})
    assert np.log(q[0, 1] / q[0, 0]) == pytest.approx(2 - np.log(9), rel=1e-5)


def test_similarity_softens_and_anneals():
    cfg = {"class_similarity": 0.8, "class_similarity_anneal_iterations": 4}
    assert anneal_similarity(1, cfg) == pytest.approx(0.8)
    assert anneal_similarity(3, cfg) == pytest.approx(0.4)
    assert anneal_similarity(5, cfg) == 0.0 and anneal_similarity(9, cfg) == 0.0
    ev = np.array([[0.0, 5.0]])
    sharp = class_posteriors(ev, np.ones(2) / 2, 1.0, 9, np.arange(1), cfg)
    soft = class_posteriors(ev, np.ones(2) / 2, 1 - anneal_similarity(1, cfg), 1, np.arange(1), cfg)
    assert posterior_entropy(soft) > posterior_entropy(sharp)


def test_hard_classification_is_one_hot():
    ev = np.random.default_rng(0).normal(size=(50, 3))
    p = class_posteriors(ev, np.ones(3) / 3, 1.0, 3, np.arange(50), {"classification": "hard"})
    assert set(np.unique(p)) == {0.0, 1.0} and np.all(p.sum(axis=1) == 1)
    assert np.array_equal(p.argmax(1), ev.argmax(1))


def test_random_assignment_iterations_ignore_evidence_and_depend_on_index_only():
    cfg = {"random_assignment_iterations": 2, "seed": 3}
    ev = np.zeros((200, 2))
    ev[:, 0] = 100.0  # the evidence says class 1 for everybody
    idx = np.arange(200)
    p = class_posteriors(ev, np.ones(2) / 2, 1.0, 1, idx, cfg)
    assert 0.35 < p[:, 1].mean() < 0.65
    # the same particle gets the same class whatever shard it is in
    q = class_posteriors(ev[50:80], np.ones(2) / 2, 1.0, 1, idx[50:80], cfg)
    assert np.array_equal(p[50:80], q)
    assert class_posteriors(ev, np.ones(2) / 2, 1.0, 3, idx, cfg)[:, 0].min() > 0.99


def test_online_em_batch_size_and_shard_independence():
    cfg = {"online_em_iterations": 2, "batch_size_per_class": 100, "seed": 1}
    n = 5000
    all_sel = online_em_selection(np.arange(n), n, 2, 1, cfg)
    assert abs(all_sel.sum() - 200) < 45  # K x batch on average
    part = online_em_selection(np.arange(1000, 2000), n, 2, 1, cfg)
    assert np.array_equal(part, all_sel[1000:2000])
    assert not np.array_equal(all_sel, online_em_selection(np.arange(n), n, 2, 2, cfg))
    assert online_em_selection(np.arange(n), n, 2, 3, cfg).all()  # full EM afterwards
