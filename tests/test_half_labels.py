"""One labelling of the classes across the two half-sets (``steps.reconstruct``): the
halves are refined independently, so half B's class 1 may hold the state of half A's
class 2. Reconstruct matches them once per iteration, before the FSC, and every reader
of the iteration's assignments relabels half B's particles the same way."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from hetrefine.classification import half_b_order, relabel_half_b
from hetrefine.config import defaults
from hetrefine.io import run_files
from hetrefine.pipeline import prepare_run
from hetrefine.simulate import SimulationSpec, simulate_dataset
from hetrefine.steps import settings_for
from hetrefine.steps.align import align_chunks
from hetrefine.steps.hard_sums import hard_sums
from hetrefine.steps.reconstruct import reconstruct

SWAP = np.array([1, 0])


def _swap_half_b(src: Path, dst: Path) -> None:
    """Copy iteration 1's assignment and sums files with half B's two classes swapped
    (what a half-set that separated the states under the other labels writes)."""
    for p in sorted((src / "iter_001" / "align").glob("*.npz")):
        out = dst / p.relative_to(src)
        if p.name.endswith(".sums.npz"):
            d = run_files.read_sums(p)
            num, wgt = d["num"].copy(), d["wgt"].copy()
            num[:, 1], wgt[:, 1] = num[SWAP, 1], wgt[SWAP, 1]
            run_files.write_sums(out, num, wgt, int(d["grid_size"]))
        else:
            run_files.write_assignments(out, **relabel_half_b(run_files.read_assignments(p), SWAP))


def test_swapped_half_b_labels_matched_before_the_fsc(tmp_path):
    spec = SimulationSpec(n_particles=240, box=32, snr=0.5, domain_fraction=0.3, seed=3)
    simulate_dataset(spec, tmp_path / "data")
    cfg = defaults()
    cfg.update(
        iterations=2, shard_size=120, online_em_iterations=0, class_similarity=0.0, device="cpu"
    )
    models = [str(tmp_path / "data" / f"initial_model_{k:02d}.mrc") for k in (1, 2)]
    run = prepare_run(str(tmp_path / "data" / "particles.star"), models, str(tmp_path / "a"), cfg)
    assign = run.all_assignments(1)
    sums = [run.sums(1, s) for s in range(run.n_shards)]
    for s in range(run.n_shards):
        align_chunks(
            list(run.chunks[s]), run.references(0), run.model(0), run.mask, run.focus_mask, [], 1,
            assign[s], sums[s], settings_for("align", cfg), "cpu",
        )  # fmt: skip
    # the same run with half B's labels swapped in its assignments and sums
    swap = run_files.RunLayout(str(tmp_path / "b"))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    _swap_half_b(tmp_path / "a", tmp_path / "b")
    rec = settings_for("reconstruct", cfg)
    for r in (run, swap):
        reconstruct(
            [a.replace(run.root, r.root) for a in assign],
            [s.replace(run.root, r.root) for s in sums],
            r.model(0), r.references(0), [], r.mask, 1, r.references(1), r.model(1), rec,
        )  # fmt: skip
    m_a, m_b = run_files.read_model(run.model(1)), run_files.read_model(swap.model(1))
    # the right FSC (between the same state's halves), maps and class statistics
    np.testing.assert_allclose(np.array(m_b["fsc"]), np.array(m_a["fsc"]), atol=1e-6)
    assert min(np.array(m_a["fsc"])[:, 1:4].min(axis=1)) > 0.8
    np.testing.assert_allclose(
        run_files.read_references(swap.references(1))["maps"],
        run_files.read_references(run.references(1))["maps"],
        atol=1e-5,
    )
    assert m_b["class_sizes_hard"] == m_a["class_sizes_hard"]
    assert m_a["half_b_order"] == [0, 1]  # consistent labels: nothing to permute
    assert m_b["half_b_order"] == [1, 0]  # swapped: half B's classes put back
    np.testing.assert_allclose(m_b["class_fractions"], m_a["class_fractions"], atol=1e-6)
    # every reader relabels half B's particles: the assignments ...
    for a in assign:
        got = relabel_half_b(
            run_files.read_assignments(a.replace(run.root, swap.root)), half_b_order(m_b)
        )
        want = run_files.read_assignments(a)
        for key in ("posterior", "euler", "shift", "loglik"):
            np.testing.assert_array_equal(got[key], want[key])
    # ... the hard-assignment sums ...
    for r in (run, swap):
        hard_sums(
            list(run.chunks[0]), assign[0].replace(run.root, r.root), r.model(1),
            r.hard_sums(0), settings_for("hard_sums", cfg), "cpu",
        )  # fmt: skip
    h_a, h_b = run_files.read_sums(run.hard_sums(0)), run_files.read_sums(swap.hard_sums(0))
    np.testing.assert_array_equal(h_b["num"], h_a["num"])
    # ... and the next iteration's changed fraction (the same iteration 2 for both)
    assign2 = run.all_assignments(2)
    sums2 = [run.sums(2, s) for s in range(run.n_shards)]
    for s in range(run.n_shards):
        align_chunks(
            list(run.chunks[s]), run.references(1), run.model(1), run.mask, run.focus_mask, [], 2,
            assign2[s], sums2[s], settings_for("align", cfg), "cpu",
        )  # fmt: skip
    for r in (run, swap):
        reconstruct(
            assign2, sums2, r.model(1), r.references(1),
            [a.replace(run.root, r.root) for a in assign], r.mask, 2,
            r.references(2), r.model(2), rec,
        )  # fmt: skip
    c_a = run_files.read_model(run.model(2))["changed_fraction"]
    c_b = run_files.read_model(swap.model(2))["changed_fraction"]
    assert c_a < 0.2 and c_b == c_a, (c_a, c_b)
