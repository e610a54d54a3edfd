"""The self-evidence correction (``classification.self_evidence``) is estimated once per
iteration over the whole data set (``steps.reconstruct`` adds every chunk's statistics),
so with it on the results do not depend on how the particles are split into shards."""

from __future__ import annotations

import numpy as np

from hetrefine.classification import half_b_order, relabel_half_b
from hetrefine.config import defaults
from hetrefine.io import run_files
from hetrefine.pipeline import run_pipeline
from hetrefine.plan import CHUNK_PARTICLES
from hetrefine.simulate import SimulationSpec, simulate_dataset
from hetrefine.steps.align import self_sample

N, ITERATIONS = 240, 4


def _run(data, out, **over):
    cfg = defaults()
    cfg.update(iterations=ITERATIONS, online_em_iterations=0, device="cpu", workers=None)
    cfg.update({"self_evidence_correction": True, **over})
    models = [str(data / f"initial_model_{k:02d}.mrc") for k in (1, 2)]
    run = run_pipeline(str(data / "particles.star"), models, str(out), cfg, final_outputs=False)
    mdl = run_files.read_model(run.model(ITERATIONS))
    a = run_files.assemble_assignments(run.all_assignments(ITERATIONS), N)
    return run, relabel_half_b(a, half_b_order(mdl))["posterior"]


def test_self_evidence_independent_of_the_shard_count(tmp_path):
    data = tmp_path / "data"
    simulate_dataset(SimulationSpec(n_particles=N, box=24, snr=0.5, domain_fraction=0.3), data)
    run_a, post_a = _run(data, tmp_path / "a", shard_size=N)  # one shard
    run_b, post_b = _run(data, tmp_path / "b", shard_size=60)  # four shards
    assert (run_a.n_shards, run_b.n_shards) == (1, 4)
    measured = []
    for it in range(1, ITERATIONS + 1):  # one estimate per iteration, whatever the shards
        s_a = run_files.read_model(run_a.model(it)).get("self_evidence")
        s_b = run_files.read_model(run_b.model(it)).get("self_evidence")
        assert (s_a is None) == (s_b is None), it
        if s_a is not None:
            np.testing.assert_allclose(s_b, s_a, rtol=1e-4, atol=1e-4)
            measured.append(max(s_a))
    # none in iteration 1 (nothing to compare the classes with); measured, not zero, once
    # the half-sets hold the same classes: a particle is in its class's map
    assert run_files.read_model(run_a.model(1)).get("self_evidence") is None
    assert measured and max(measured) > 0.1, measured
    np.testing.assert_allclose(post_b, post_a, atol=1e-4)
    # and the correction is applied (from the estimates of the iterations before the last)
    _, post_off = _run(data, tmp_path / "off", shard_size=N, self_evidence_correction=False)
    assert np.abs(post_off - post_a).max() > 1e-3


def test_self_evidence_sample_is_whole_chunks():
    """The sample scored against the other half-set's maps is whole chunks of
    plan.CHUNK_PARTICLES particles (a chunk outside it pays nothing: the cost is mostly
    the other half's projections at every coarse rotation, once per chunk that holds any
    sample particle), about SELF_SAMPLE_TARGET particles in all, at least a quarter of a
    small data set, chosen by index only (so whatever the sharding)."""
    for n, expected in ((240, 240), (2000, 500), (10_000, 2000), (500_000, 2000)):
        index = np.arange(n)
        inside = self_sample(index, n)
        assert inside.sum() == expected, (n, inside.sum())
        per_chunk = np.add.reduceat(inside, np.arange(0, n, CHUNK_PARTICLES))
        assert set(per_chunk.tolist()) <= {0, min(n, CHUNK_PARTICLES)}, (n, per_chunk)
        shuffled = np.random.default_rng(0).permutation(n)  # another split, same particles
        np.testing.assert_array_equal(self_sample(shuffled, n), inside[shuffled])
