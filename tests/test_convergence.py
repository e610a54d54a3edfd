"""Convergence as a rule (issue 18, item 3): ``iterations`` is a cap; a run stops at the
first converged iteration and the later ones pass through at no cost; a run that never
separates never says ``converged`` and says why; a killed run resumes across a
pass-through to the same files.

Runs the workflow's steps (``hetrefine.pipeline``) on tiny simulated sets (240
particles, box 24, two shards) with one online-EM and one annealing iteration, so the
earliest possible stop is iteration 3."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hetrefine import convergence
from hetrefine.config import defaults
from hetrefine.io import run_files
from hetrefine.io.star import read_star_blocks
from hetrefine.pipeline import finish_run, prepare_run, run_iteration
from hetrefine.simulate import SimulationSpec, simulate_dataset

CAP = 10


def config(**over) -> dict:
    cfg = defaults()
    cfg.update(
        iterations=CAP,
        shard_size=120,
        online_em_iterations=1,
        class_similarity_anneal_iterations=1,
        device="cpu",
    )
    cfg.update(over)
    return cfg


def simulated(tmp_path_factory, name: str, n_classes: int) -> Path:
    d = tmp_path_factory.mktemp(name)
    spec = SimulationSpec(
        n_particles=240, n_classes=n_classes, box=24, pixel_size=4.0, snr=2.0, seed=0,
        domain_fraction=0.25,
    )  # fmt: skip
    simulate_dataset(spec, d)
    return d


def iterate(run, cfg: dict, first: int, last: int) -> dict[int, float]:
    """Iterations first..last; the CPU seconds of each."""
    cpu = {}
    for it in range(first, last + 1):
        t = time.process_time()
        run_iteration(run, cfg, it)
        cpu[it] = time.process_time() - t
    return cpu


def same_array(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def model(run, it: int) -> dict:
    return run_files.read_model(run.model(it))


def digest(paths) -> dict[str, str]:
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def run_files_of(run, it: int) -> list[str]:
    return [run.references(it), run.model(it), *run.all_assignments(it)]


@pytest.fixture(scope="module")
def easy(tmp_path_factory):
    """Two well separated states, run with a cap of 10: (data, run, CPU per iteration)."""
    data = simulated(tmp_path_factory, "easy", 2)
    cfg = config()
    models = [str(data / "initial_model_01.mrc"), str(data / "initial_model_02.mrc")]
    run = prepare_run(
        str(data / "particles.star"), models, str(tmp_path_factory.mktemp("run")), cfg
    )
    cpu = iterate(run, cfg, 1, CAP)
    return data, run, cpu


def test_the_rule():
    """Converged: separated, < 1% changed, resolution limit steady, past the early regimes."""
    cfg = config()
    sep = np.eye(2)[np.arange(100) % 2]  # one-hot, half and half
    assert convergence.earliest_stop(cfg) == 3
    assert (
        convergence.earliest_stop(config(online_em_iterations=3, random_assignment_iterations=5))
        == 7
    )
    v = convergence.verdict(sep, 0.005, 20.0, 19.5, 3, cfg)
    assert v["converged"] and v["separated"] and v["stopped_at"] == 3
    assert v["stop_reason"].startswith(
        "converged at iteration 3: 0.50% of the particles changed class"
    )
    assert not convergence.verdict(sep, 0.005, 20.0, 19.5, 2, cfg)["converged"]  # too early
    assert not convergence.verdict(sep, 0.02, 20.0, 20.0, 5, cfg)["converged"]  # 2% changed
    assert not convergence.verdict(sep, 0.0, 20.0, 18.0, 5, cfg)["converged"]  # resolution gain
    assert not convergence.verdict(sep, None, 20.0, 20.0, 5, cfg)["converged"]
    assert convergence.verdict(
        sep, 0.015, 20.0, 20.0, 5, config(convergence_changed_fraction=0.02)
    )["converged"]
    off = convergence.verdict(sep, 0.0, 20.0, 20.0, 5, config(stop_when_converged=False))
    assert off["converged"] and off["stopped_at"] is None  # reported, not stopped
    one = np.eye(2)[np.zeros(100, int)]  # every particle in class 1: stable, not converged
    v = convergence.verdict(one, 0.0, 20.0, 20.0, 5, cfg)
    assert not v["converged"] and not v["separated"] and v["stopped_at"] is None
    assert "class 1 holds 100 of 100 particles" in v["stop_reason"]


def test_one_structure_in_two_classes_is_not_separated():
    """Half-maps of one structure with independent noise correlate fully across classes
    (1 within the noise, whatever the noise level); a moved domain lowers it."""
    rng = np.random.default_rng(0)
    box = 32
    g = np.indices((box,) * 3) - box // 2

    def blob(c, r):
        return np.exp(-((g - np.array(c)[:, None, None, None]) ** 2).sum(0) / (2 * r * r))

    body = sum(blob(rng.uniform(-5, 5, 3), rng.uniform(2, 3)) for _ in range(12))
    moved = [body + 2 * blob((8, 0, 0), 2.5), body + 2 * blob((-8, 0, 0), 2.5)]

    def halves(vol, sd):
        return np.stack([vol + sd * rng.normal(size=vol.shape) for _ in range(2)])

    mask = np.ones((box,) * 3)
    for sd in (0.05, 0.2):
        one = np.stack([halves(moved[0], sd), halves(moved[0], sd)])
        two = np.stack([halves(moved[0], sd), halves(moved[1], sd)])
        assert convergence.signal_correlation(one, mask)[0, 1] == pytest.approx(1.0, abs=0.02)
        assert convergence.signal_correlation(two, mask)[0, 1] < 0.9
        assert "classes 1 and 2 are one structure" in convergence.same_structure(one, mask)
        assert convergence.same_structure(two, mask) is None
    v = convergence.verdict(np.eye(2)[np.arange(100) % 2], 0.0, 20.0, 20.0, 5, config(), one, mask)
    assert not v["separated"] and not v["converged"]


def test_a_run_stops_when_converged_and_passes_through_to_the_cap(easy, caplog):
    """Cap 10 on an easy set: it stops early, iterations after the stop cost almost no
    CPU, the last iteration's files are the stopping iteration's, and the final outputs
    and their log say where and why it stopped. Before the rule every iteration ran."""
    data, run, cpu = easy
    last = model(run, CAP)
    stop = last["stopped_at"]
    assert stop is not None and 3 <= stop < CAP, last["stop_reason"]
    assert last["converged"] and last["separated"] and last["iteration"] == CAP
    assert model(run, stop)["stopped_at"] == stop and not model(run, stop).get("passed_through")
    assert model(run, stop - 1)["stopped_at"] is None
    assert all(model(run, it)["passed_through"] for it in range(stop + 1, CAP + 1))
    # the files of the cap are the stopping iteration's (the model but for its counters)
    a, b = (
        run_files.read_references(run.references(stop)),
        run_files.read_references(run.references(CAP)),
    )
    assert np.array_equal(a["maps"], b["maps"])
    for s in range(run.n_shards):
        x, y = (
            run_files.read_assignments(run.assignments(stop, s)),
            run_files.read_assignments(run.assignments(CAP, s)),
        )
        assert set(x) == set(y) and all(same_array(x[k], y[k]) for k in x)
    same = {
        k: v
        for k, v in last.items()
        if k not in ("iteration", "passed_through", "changed_fraction")
    }
    assert same == {k: v for k, v in model(run, stop).items() if k in same}
    # pass-through iterations: no particle aligned, no map reconstructed
    real = np.mean([cpu[it] for it in range(2, stop + 1)])
    passed = [cpu[it] for it in range(stop + 1, CAP + 1)]
    assert max(passed) < 0.05 * real, (passed, real)
    # the final outputs (from the cap's files) classify as the stopping iteration did, rightly
    with caplog.at_level(logging.INFO, logger="hetrefine"):
        finish_run(run, config())
    assert f"refinement stopped at iteration {stop} of at most {CAP}: converged" in caplog.text
    star = read_star_blocks(Path(run.root) / "particles_all.star")["particles"]
    cls = star["rlnClassNumber"].to_numpy(int) - 1
    truth = pd.read_csv(data / "truth.csv")["class"].to_numpy() - 1
    hard = run_files.assemble_assignments(run.all_assignments(stop), len(cls))["posterior"].argmax(
        1
    )
    assert np.array_equal(cls, hard)
    assert max(np.mean(cls == truth), np.mean(cls != truth)) > 0.95


def test_a_killed_run_resumes_across_a_pass_through(easy):
    """A run killed in a pass-through iteration (one shard's align done, reconstruct not)
    resumes, as Snakemake would rerun the incomplete jobs and what follows, to the very
    same files as the run that was not killed."""
    _, run, _ = easy
    stop = model(run, CAP)["stopped_at"]
    killed = min(stop + 2, CAP)
    later = [f for it in range(killed, CAP + 1) for f in run_files_of(run, it)]
    before = digest(later)
    for it in range(killed, CAP + 1):
        for f in run_files_of(run, it):
            if not (it == killed and f == run.assignments(killed, 0)):  # shard 0 had finished
                Path(f).unlink()
    iterate(run, config(), killed, CAP)
    assert digest(later) == before


def test_a_run_that_cannot_separate_never_converges_and_says_so(tmp_path_factory, caplog):
    """One state, two copies of its map: the random split of iteration 1 gives two
    confident classes (posterior entropy ~0.1 nats) of one structure. Every iteration says
    `separated: false` (their signals correlate fully), none `converged`, nothing stops,
    and the final log says it reached the cap and never separated."""
    data = simulated(tmp_path_factory, "one_state", 1)
    cap = 4
    cfg = config(iterations=cap)
    m = str(data / "initial_model_01.mrc")
    run = prepare_run(
        str(data / "particles.star"), [m, m], str(tmp_path_factory.mktemp("run")), cfg
    )
    iterate(run, cfg, 1, cap)
    models = [model(run, it) for it in range(1, cap + 1)]
    assert not any(x["converged"] for x in models) and not any(
        x.get("passed_through") for x in models
    )
    assert all(x["stopped_at"] is None for x in models)
    assert models[-1]["separated"] is False
    assert models[-1]["stop_reason"].startswith(
        "the classes have not separated: classes 1 and 2 are one structure within the noise"
    )
    with caplog.at_level(logging.WARNING, logger="hetrefine"):
        finish_run(run, cfg)
    assert f"refinement reached the iteration cap ({cap}) and never separated" in caplog.text
    summary = convergence.stop_summary(json.loads(Path(run.model(cap)).read_text()))
    assert summary.startswith(f"reached the iteration cap ({cap}) and never separated: ")
