"""Sums I/O that does not grow with the particle count (issue 17, item 2).

The shards follow the machine (``workers``), not N/500; a shard is streamed in chunks;
the shards' sums are added in a tree of at most ``SUMS_FAN_IN`` files per job; sums are
stored in single precision, which leaves the maps and FSC as double-precision sums give.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_workflow import copy_workflow, job_stats, jobs, overrides, smk  # the workflow's copy

from hetrefine import plan
from hetrefine.backprojection import SumsGrid, hard_class_sums
from hetrefine.ctf import compute_ctf
from hetrefine.io import run_files
from hetrefine.io.run_files import RunLayout
from hetrefine.mask import soft_sphere
from hetrefine.pipeline import reduce_tree
from hetrefine.projection import PAD, prepare_reference, project
from hetrefine.reconstruction import half_maps, unpack_sums
from hetrefine.rotations import random_rotations

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def wd(tmp_path: Path) -> Path:
    return copy_workflow(tmp_path)


def local_workers() -> int:
    profile = yaml.safe_load((ROOT / "workflow/profiles/local/config.yaml").read_text())
    return int(profile["config"]["workers"])


# ------------------------------------------------------------------ the plan


def test_auto_shards_follow_the_workers_not_the_particle_count():
    workers = local_workers()
    for n in (100_000, 500_000):
        assert plan.n_shards(n, "auto", workers) == workers
        chunks = [list(plan.shard_chunks(s, n, "auto", workers)) for s in range(workers)]
        flat = [c for cs in chunks for c in cs]
        assert flat == list(range(plan.n_chunks(n, "auto")))  # every chunk once, in order
        assert plan.chunk_size("auto") * plan.n_chunks(n, "auto") >= n
    # fewer chunks than workers: one shard per chunk; an explicit size is honoured
    assert plan.n_shards(1000, "auto", 64) == 2
    assert [plan.n_shards(n, s) for n, s in [(1000, 500), (1001, 500), (1000, 600)]] == [2, 3, 2]
    assert [plan.chunk_size(s) for s in (100, 500, 600, 1000, "auto")] == [100, 500, 300, 500, 500]


def test_align_memory_is_flat_in_the_particle_count():
    """The request follows the chunk: 10x the particles on the same workers adds only the
    per-particle results (posteriors, poses), a few MB."""
    kw = dict(box=128, k_classes=4, n_shifts=29, n_rots=4392)
    chunk = plan.chunk_size("auto")
    small = plan.align_memory_bytes(chunk, n_results=plan.shard_particles(50_000, "auto", 8), **kw)
    large = plan.align_memory_bytes(chunk, n_results=plan.shard_particles(500_000, "auto", 8), **kw)
    assert large - small < 0.05 * small
    assert large - small < plan.align_memory_bytes(10 * chunk, **kw) - plan.align_memory_bytes(
        chunk, **kw
    )


@pytest.mark.parametrize(
    ("leaves", "levels"), [(1, []), (8, []), (9, [2]), (64, [8]), (65, [9, 2])]
)
def test_reduce_tree_reads_at_most_fan_in_files(leaves, levels):
    assert plan.reduce_levels(leaves) == levels
    below = leaves
    for n in levels:  # every file of a level is added exactly once by one node above
        kids = [list(plan.reduce_children(j, below)) for j in range(n)]
        assert [i for k in kids for i in k] == list(range(below))
        assert max(len(k) for k in kids) <= plan.SUMS_FAN_IN
        below = n
    assert below <= plan.SUMS_FAN_IN


# ------------------------------------------------------------------ the workflow


def test_dag_for_100k_particles_has_workers_shards(wd):
    """The local profile at N = 100,000, box 128: `workers` align jobs per iteration,
    a reconstruct that reads that many sums files (no more than the fan-in)."""
    big = {
        "iterations": 2,
        "online_em_iterations": 1,
        "demo": {"n_particles": 100_000, "box": 128},
        "refine_box": 64,
    }
    result = smk(wd, "-n", "--profile", "workflow/profiles/local", *overrides(wd, **big))
    assert result.returncode == 0, result.stdout[-3000:]
    workers = local_workers()
    stats = job_stats(result.stdout)
    assert stats["align"] == 2 * workers and stats["hard_sums"] == workers
    for job in jobs(result.stdout, "reconstruct"):
        assert job["input"].count(".sums.npz") == workers <= plan.SUMS_FAN_IN
    for job in jobs(result.stdout, "align"):
        assert job["input"].count("preprocess/chunk_") == 100_000 // 500 // workers


def test_dag_with_more_shards_than_the_fan_in_reduces_in_a_tree(wd):
    """20 workers: 20 shards, 3 reduce_sums per iteration (and 3 for the hard sums), each
    reading at most 8 files; reconstruct and write_classes read the tree's 3."""
    cfg = {
        "iterations": 2,
        "online_em_iterations": 1,
        "workers": 20,
        "demo": {"n_particles": 20_000},
    }
    result = smk(wd, "-n", *overrides(wd, **cfg))
    assert result.returncode == 0, result.stdout[-3000:]
    stats = job_stats(result.stdout)
    assert (stats["align"], stats["reduce_sums"], stats["hard_sums"]) == (40, 2 * 3 + 3, 20)
    for job in jobs(result.stdout, "reduce_sums"):
        assert 1 <= job["input"].count(".sums.npz") <= plan.SUMS_FAN_IN
    for job in jobs(result.stdout, "reconstruct"):
        assert re.findall(r"iter_\d{3}/sums/tree_1_\d{4}\.sums\.npz", job["input"])
        assert job["input"].count(".sums.npz") == 3
    (write,) = jobs(result.stdout, "write_classes")
    assert write["input"].count("final/sums/tree_1_") == 3


# ------------------------------------------------------------------ the sums


def _shard_sums(n_shards: int, per_shard: int, box: int = 32, seed: int = 0):
    """Real backprojection sums (K=2 classes x 2 half-sets) of noisy CTF-modulated
    projections of two blob volumes, one array pair per shard."""
    rng = np.random.default_rng(seed)
    g = np.arange(box) - box // 2
    z, y, x = np.meshgrid(g, g, g, indexing="ij")
    vols = []
    for _ in range(2):
        vol = np.zeros((box,) * 3, np.float32)
        for c in rng.uniform(-5, 5, (5, 3)):
            vol += np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / 6.0)
        vols.append(prepare_reference(vol, PAD))
    grid = SumsGrid.create(box, box / 2 - 1, np, full_grid=True)
    px = 3.0
    shards = []
    for _ in range(n_shards):
        num = np.zeros((2, 2, grid.n_packed), np.complex64)
        wgt = np.zeros((2, 2, grid.n_packed), np.float32)
        for k in range(2):
            for h in range(2):
                rots = random_rotations(per_shard, rng).astype(np.float32)
                params = np.tile([15000, 15000, 0, 300, 2.7, 0.1, 0, 0], (per_shard, 1))
                params[:, :2] += rng.uniform(-5000, 5000, (per_shard, 1))
                c = compute_ctf(
                    params.astype(np.float32), grid.kx / (box * px), grid.ky / (box * px)
                )
                clean = project(vols[k], rots, grid.kx, grid.ky, PAD) * c
                noise = rng.normal(0, 1, clean.shape) + 1j * rng.normal(0, 1, clean.shape)
                scale = 2.0 * np.abs(clean).mean()
                y_ = (clean + scale * noise).astype(np.complex64)
                num[k, h], wgt[k, h] = hard_class_sums(y_, c, rots, np.zeros((per_shard, 2)), grid)
        shards.append((num, wgt))
    return shards, grid.size, box


def _maps(num, wgt, size, box):
    num_c, wgt_c = unpack_sums(num, wgt, size)
    mask = soft_sphere(box, 1.0, box * 0.7, box * 0.9)
    return [half_maps(num_c[k], wgt_c[k], box, np.eye(3)[None], mask, 1.0) for k in range(2)]


def test_single_precision_tree_gives_the_maps_and_fsc_of_double_precision_sums(tmp_path):
    """20 shards' sums written in float32 and added in the tree (3 nodes, each file
    rounded to float32) against the same sums added and kept in float64: the maps agree
    to float32 rounding, the FSC curves to 1e-4, at half the bytes of float64 files."""
    shards, size, box = _shard_sums(20, 12)
    layout = RunLayout(str(tmp_path))
    leaves = []
    for s, (num, wgt) in enumerate(shards):
        leaves.append(layout.sums(1, s))
        run_files.write_sums(leaves[-1], num, wgt, size)
    top = reduce_tree(layout, layout.iteration_stage(1), leaves)
    assert len(top) == 3 and all("tree_1_" in p for p in top)
    num32, wgt32, _ = run_files.add_sums(top)
    num64 = sum(n.astype(np.complex128) for n, _ in shards)
    wgt64 = sum(w.astype(np.float64) for _, w in shards)
    # the tree equals the flat sum to float32 rounding
    assert np.abs(num32 - num64).max() <= 1e-6 * np.abs(num64).max()
    assert np.abs(wgt32 - wgt64).max() <= 1e-6 * wgt64.max()
    flat = run_files.add_sums(leaves)
    assert np.abs(flat[0] - num32).max() <= 1e-6 * np.abs(num64).max()

    for (m32, f32), (m64, f64) in zip(
        _maps(num32, wgt32, size, box), _maps(num64, wgt64, size, box)
    ):
        assert np.abs(m32 - m64).max() <= 1e-5 * np.abs(m64).max()
        assert np.abs(np.asarray(f32) - np.asarray(f64)).max() <= 1e-4
        assert f64[box // 8] > 0.5  # a real signal, not two empty maps

    # single precision: half the bytes of the same sums in double precision
    path64 = tmp_path / "double.npz"
    np.savez(path64, num=num64, wgt=wgt64, grid_size=np.int64(size))
    bytes32 = Path(top[0]).stat().st_size
    assert bytes32 < 0.51 * path64.stat().st_size
    assert bytes32 == pytest.approx(num32.size * (8 + 4), rel=0.01)  # complex64 + float32


def test_a_shard_streamed_in_chunks_equals_the_shard_in_one_piece(tmp_path):
    """120 particles as one chunk, and as two chunks of 60 streamed by one align job: the
    same assignments and the same sums (to float32 rounding), one file of each."""
    from hetrefine.config import defaults
    from hetrefine.pipeline import prepare_run
    from hetrefine.simulate import SimulationSpec, simulate_dataset
    from hetrefine.steps import settings_for
    from hetrefine.steps.align import align_chunks

    spec = SimulationSpec(n_particles=120, n_classes=2, box=24, pixel_size=4.0, snr=0.1, seed=0)
    simulate_dataset(spec, tmp_path / "data")
    models = [str(tmp_path / "data" / f"initial_model_{i:02d}.mrc") for i in (1, 2)]
    out = {}
    for size in (120, 60):
        cfg = defaults()
        cfg.update(
            shard_size=size, iterations=1, online_em_iterations=0, coarse_angle_step_deg=30,
            local_refine_levels=1, device="cpu",
        )  # fmt: skip
        run = prepare_run(
            str(tmp_path / "data" / "particles.star"), models, str(tmp_path / f"r{size}"), cfg
        )
        chunks = [c for shard in run.chunks for c in shard]  # every chunk into one job
        assert len(chunks) == 120 // size
        align_chunks(
            chunks, run.references(0), run.model(0), run.mask, run.focus_mask, [], 1, run.assignments(1, 0),
            run.sums(1, 0), settings_for("align", cfg), "cpu",
        )  # fmt: skip
        out[size] = (
            run_files.read_assignments(run.assignments(1, 0)),
            run_files.read_sums(run.sums(1, 0)),
        )
        assert not list(Path(run.root, "iter_001", "align").glob(".chunks-*"))  # temp removed
    (a1, s1), (a2, s2) = out[120], out[60]
    np.testing.assert_array_equal(a1["index"], a2["index"])
    np.testing.assert_allclose(a1["posterior"], a2["posterior"], atol=1e-5)
    np.testing.assert_allclose(a1["noise_power"], a2["noise_power"], rtol=1e-5)
    assert s1["num"].dtype == np.complex64 and s1["wgt"].dtype == np.float32
    assert np.abs(s1["num"] - s2["num"]).max() <= 1e-5 * np.abs(s1["num"]).max()
    assert np.abs(s1["wgt"] - s2["wgt"]).max() <= 1e-5 * s1["wgt"].max()
