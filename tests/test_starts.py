"""Starts that carry no class information: K copies of one map found and split at random
in iteration 1, and one labelling of the classes across the two half-sets."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pandas as pd
import pytest

from hetrefine.classification import half_b_order, relabel_half_b
from hetrefine.config import defaults
from hetrefine.io import run_files
from hetrefine.io.mrc import read_volume, write_mrc
from hetrefine.pipeline import run_pipeline
from hetrefine.simulate import SimulationSpec, lowpass, phantoms, simulate_dataset
from hetrefine.starts import (
    half_set_label_match,
    same_map_groups,
    same_map_pairs,
    split_same_map_groups,
)


def _states(box=32, px=4.0):
    spec = SimulationSpec(n_particles=10, box=box, pixel_size=px, domain_fraction=0.15, seed=0)
    return [lowpass(v, 30.0, px) for v in phantoms(spec)]


def test_copies_of_one_map_found_distinct_states_not():
    """Copies of one map on different grey scales (and with a little noise, as maps
    reconstructed from random subsets) are one group; two states whose domain sits
    elsewhere are not, at the same 30 A low-pass (FSC taken to its shell, 128 / 30)."""
    a, b = _states()
    rng = np.random.default_rng(0)
    noisy = 7.5 * a + 0.002 * np.abs(a).max() * rng.normal(size=a.shape).astype(np.float32)
    maps = np.stack([a, b, 0.3 * a, noisy])
    pairs = same_map_pairs(maps, 32 * 4.0 / 30.0)
    assert {(i, j) for i, j, _ in pairs} == {(0, 2), (0, 3), (2, 3)}, pairs
    assert same_map_groups(4, pairs) == [[0, 2, 3]]
    assert same_map_pairs(np.stack([a, b]), 32 * 4.0 / 30.0) == []


def test_same_map_fsc_1_groups_only_copies():
    """``same_map_fsc: 1``: copies on other grey scales stay one group; maps that differ
    by a little noise (random-subset reconstructions) are taken as distinct."""
    a, _ = _states()
    rng = np.random.default_rng(2)
    noisy = a + 0.05 * np.abs(a).max() * rng.normal(size=a.shape).astype(np.float32)
    maps = np.stack([a, 0.3 * a, lowpass(noisy, 30.0, 4.0)])
    radius = 32 * 4.0 / 30.0
    lowest = {(i, j): f for i, j, f in same_map_pairs(maps, radius)}
    assert set(lowest) == {(0, 1), (0, 2), (1, 2)} and lowest[0, 2] < 0.999, lowest
    assert [(i, j) for i, j, _ in same_map_pairs(maps, radius, 1.0)] == [(0, 1)]


def test_maps_low_passed_below_the_start_compared_where_they_hold_density():
    """Two maps of one state from different particles (noise), low-passed to 30 A as
    ab-initio maps often are, compared up to a 14 A start: the shells beyond 30 A hold
    round-off, not density, and are not compared, so the maps are one group (their FSC
    there is noise: they were taken as distinct and never separated, 59%). Two states
    low-passed alike stay distinct."""
    a, b = _states()
    rng = np.random.default_rng(1)
    scale = 0.01 * np.abs(a).max()
    subsets = [lowpass(a + scale * rng.normal(size=a.shape).astype(np.float32), 30.0, 4.0)]
    subsets.append(
        3.0 * lowpass(a + scale * rng.normal(size=a.shape).astype(np.float32), 30.0, 4.0)
    )
    radius = 32 * 4.0 / 14.0
    pairs = same_map_pairs(np.stack(subsets), radius)
    assert [(i, j) for i, j, _ in pairs] == [(0, 1)], pairs
    assert same_map_pairs(np.stack([a, b]), radius) == []


def test_split_by_fit_to_the_map():
    """A group of three identical references: each particle's mass on the group goes to
    the member its fit to the map ranks it in (the first class the best explained), by
    the cuts given (one set for every shard) or by the fits' own tertiles; the rest of
    its posterior is kept."""
    n = 3000
    index = np.arange(n)
    fit = np.random.default_rng(3).normal(size=(n, 1)).astype(np.float32)
    post = np.tile(np.array([[0.25, 0.25, 0.25, 0.25]], np.float32), (n, 1))
    g = [1, 2, 3]
    out = split_same_map_groups(post, [g], index, 0, fit, [[-0.5, 0.5]])
    np.testing.assert_allclose(out[:, 0], 0.25)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-6)
    member = np.asarray(g)[out[:, g].argmax(axis=1)]
    f = fit[:, 0]
    assert np.all(member[f > 0.5] == 1) and np.all(member[f < -0.5] == 3)
    assert np.all(member[(f > -0.5) & (f < 0.5)] == 2)
    assert np.allclose(out[:, g].max(axis=1), 0.75)
    own = split_same_map_groups(post, [g], index, 0, fit)  # tertiles of these fits
    np.testing.assert_allclose(np.bincount(own[:, g].argmax(axis=1)), [1000, 1000, 1000], atol=1)


def test_split_gives_each_particle_one_member_of_its_group():
    """Iteration 1 from references 1 and 3 identical (2 distinct): each particle's mass on
    the group goes to one of its members at random (about half each), the rest of its
    posterior is kept, and the draw depends on the particle's index only (sharding)."""
    n = 4000
    index = np.arange(n)
    post = np.tile(np.array([[0.3, 0.4, 0.3]], np.float32), (n, 1))
    out = split_same_map_groups(post, [[0, 2]], index, seed=5)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(out[:, 1], 0.4)
    grp = out[:, [0, 2]]
    assert np.all((grp == 0) | np.isclose(grp, 0.6))
    assert np.all((grp > 0).sum(axis=1) == 1)
    assert abs((out[:, 0] > 0).mean() - 0.5) < 0.03
    part = split_same_map_groups(post[1000:1500], [[0, 2]], index[1000:1500], seed=5)
    np.testing.assert_array_equal(part, out[1000:1500])
    assert not np.array_equal(split_same_map_groups(post, [[0, 2]], index, seed=6), out)


def test_half_set_labels_matched_by_what_differs():
    """Half B holds the same three states as half A in another order, with its own noise
    and grey scale: half B's classes are read in half A's order (compared at full
    resolution or low-passed); agreeing halves and identical maps (nothing to match
    yet) keep the identity."""
    spec = SimulationSpec(n_particles=10, n_classes=3, box=24, domain_fraction=0.2, seed=1)
    states = phantoms(spec)
    rng = np.random.default_rng(2)
    perm = [2, 0, 1]  # half B's class j holds state perm[j]
    maps = np.zeros((3, 2, 24, 24, 24), np.float32)
    for k in range(3):
        maps[k, 0] = states[k] + 0.05 * rng.normal(size=states[k].shape)
        maps[k, 1] = 1.3 * states[perm[k]] + 0.05 * rng.normal(size=states[k].shape)
    for radius in (None, 4.0):  # at full resolution, and low-passed to 4 px
        order = half_set_label_match(maps, radius_px=radius)
        assert [perm[order[k]] for k in range(3)] == [0, 1, 2], (radius, order)
    same = maps.copy()
    same[:, 1] = same[:, 0]
    np.testing.assert_array_equal(half_set_label_match(same), np.arange(3))
    np.testing.assert_array_equal(half_set_label_match(np.ones((2, 2, 4, 4, 4))), [0, 1])


@pytest.mark.slow
def test_one_map_start_separates_two_states(tmp_path, caplog):
    """Two copies of one consensus map (the mean of the two states' initial models),
    800 particles whose states differ by a domain of 25% of the mass, SNR 0.1: the run
    says the models are one map, splits the particles in iteration 1 (by their fit to the
    map: 52% right here, where the two states fit the consensus alike), holds the start
    resolution for three iterations, and after 7 iterations >= 95% are in the right
    class (was 50%: every particle in class 1)."""
    spec = SimulationSpec(n_particles=800, box=48, snr=0.1, domain_fraction=0.25, seed=0)
    simulate_dataset(spec, tmp_path / "data")
    vols = [read_volume(tmp_path / "data" / f"initial_model_{k:02d}.mrc") for k in (1, 2)]
    consensus = tmp_path / "consensus.mrc"
    write_mrc(consensus, (vols[0][0] + vols[1][0]) / 2, vols[0][1])
    cfg = defaults()
    cfg.update(iterations=7, shard_size=500)
    with caplog.at_level(logging.WARNING, logger="hetrefine"):
        paths = run_pipeline(
            str(tmp_path / "data" / "particles.star"),
            [str(consensus)] * 2,
            str(tmp_path / "run"),
            cfg,
            final_outputs=False,
        )
    assert re.search(r"are the same map up to \d+ A", caplog.text), caplog.text
    models = [json.loads(open(paths.model(i)).read()) for i in range(8)]
    assert models[0]["same_map_groups"] == [[0, 1]]
    # from one map too the limit follows the classes' resolution from iteration 1
    limits = [m["res_limit_px"] for m in models]
    assert limits[1] > limits[0], limits
    idx, cls = [], []
    order = half_b_order(models[7])  # half B's classes as reconstruct matched them
    for p in paths.all_assignments(7):
        d = relabel_half_b(run_files.read_assignments(p), order)
        idx.append(d["index"])
        cls.append(d["posterior"].argmax(1))
    idx, cls = np.concatenate(idx), np.concatenate(cls)
    truth = pd.read_csv(tmp_path / "data" / "truth.csv")["class"].to_numpy() - 1
    right = (cls == truth[idx]).mean()
    assert max(right, 1 - right) >= 0.95, right
