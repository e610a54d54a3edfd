"""Class posteriors, class-similarity annealing, online-EM batches, class statistics."""

from __future__ import annotations

import numpy as np
import pytest

from hetrefine.classification import (
    anneal_similarity,
    changed_fraction,
    class_fractions,
    class_posteriors,
    online_em_selection,
    posterior_entropy,
    random_assignment,
)


def test_posteriors_follow_evidence_and_prior():
    ev = np.array([[0.0, 2.0], [10.0, 0.0]])
    p = class_posteriors(ev, np.array([0.5, 0.5]), 1.0)
    assert p[0, 1] == pytest.approx(1 / (1 + np.exp(-2)), rel=1e-6)
    assert p[1].argmax() == 0 and np.allclose(p.sum(axis=1), 1)
    # a prior of 0.9 vs 0.1 shifts the log-odds by log 9
    q = class_posteriors(ev, np.array([0.9, 0.1]), 1.0)
    assert np.log(q[0, 1] / q[0, 0]) == pytest.approx(2 - np.log(9), rel=1e-5)


def test_similarity_softens_and_anneals():
    assert anneal_similarity(1, 0.8, 4) == pytest.approx(0.8)
    assert anneal_similarity(3, 0.8, 4) == pytest.approx(0.4)
    assert anneal_similarity(5, 0.8, 4) == 0.0 and anneal_similarity(9, 0.8, 4) == 0.0
    assert anneal_similarity(1, 0.8, 0) == 0.0
    ev = np.array([[0.0, 5.0]])
    sharp = class_posteriors(ev, np.ones(2) / 2, 1.0)
    soft = class_posteriors(ev, np.ones(2) / 2, 1 - anneal_similarity(1, 0.8, 4))
    assert posterior_entropy(soft) > posterior_entropy(sharp)


def test_hard_classification_is_one_hot():
    ev = np.random.default_rng(0).normal(size=(50, 3))
    p = class_posteriors(ev, np.ones(3) / 3, 1.0, hard=True)
    assert set(np.unique(p)) == {0.0, 1.0} and np.all(p.sum(axis=1) == 1)
    assert np.array_equal(p.argmax(1), ev.argmax(1))


def test_random_assignment_depends_on_index_only():
    idx = np.arange(200)
    p = random_assignment(idx, 2, 1, seed=3)
    assert set(np.unique(p)) == {0.0, 1.0} and 0.35 < p[:, 1].mean() < 0.65
    # the same particle gets the same class whatever shard it is in
    assert np.array_equal(p[50:80], random_assignment(idx[50:80], 2, 1, seed=3))
    assert not np.array_equal(p, random_assignment(idx, 2, 2, seed=3))  # a new draw each iteration


def test_online_em_batch_size_and_shard_independence():
    n = 5000
    all_sel = online_em_selection(np.arange(n), n, 2, 1, 2, 100, 1)
    assert abs(all_sel.sum() - 200) < 45  # K x batch on average
    part = online_em_selection(np.arange(1000, 2000), n, 2, 1, 2, 100, 1)
    assert np.array_equal(part, all_sel[1000:2000])
    assert not np.array_equal(all_sel, online_em_selection(np.arange(n), n, 2, 2, 2, 100, 1))
    assert online_em_selection(np.arange(n), n, 2, 3, 2, 100, 1).all()  # full EM afterwards


def test_class_statistics():
    post = np.array([[0.9, 0.1], [0.2, 0.8], [1.0, 0.0], [1.0, 0.0]])
    f = class_fractions(post)
    assert f == pytest.approx([0.775, 0.225]) and sum(f) == pytest.approx(1.0)
    assert min(class_fractions(np.array([[1.0, 0.0]]))) == pytest.approx(1e-3 / 1.001)
    prev = np.array([[0.9, 0.1], [0.9, 0.1], [0.0, 1.0]])
    # particles 0, 1, 2 were in classes 0, 0, 1; now 2 -> 0, 0 -> 1, 1 -> 0: two of three moved
    assert changed_fraction([2, 0, 1], post[:3], [0, 1, 2], prev) == pytest.approx(2 / 3)
    assert changed_fraction([7], post[:1], [0, 1, 2], prev) is None


def test_separation_problem_names_a_collapse_and_flat_posteriors():
    from hetrefine.classification import separation_problem

    rng = np.random.default_rng(0)
    sharp = np.eye(2, dtype=np.float32)[rng.integers(0, 2, 500)]
    assert separation_problem(sharp) is None
    collapsed = np.tile(np.array([[0.9, 0.1]], np.float32), (500, 1))
    assert "class 1 holds 500 of 500" in separation_problem(collapsed)
    flat = np.full((500, 3), 1 / 3, np.float32)
    flat[::2, 1] += 0.01  # no class takes 98%, but the posteriors stay uniform
    flat[1::2, 2] += 0.01
    assert "near uniform" in separation_problem(flat / flat.sum(1, keepdims=True))
