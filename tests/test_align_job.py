"""One align job prepares its references, grids and masks once for all its chunks
(``steps.align.AlignJob``); each chunk's results are those of the chunk aligned alone."""

from __future__ import annotations

import numpy as np
import pytest

from hetrefine.config import defaults
from hetrefine.io import run_files
from hetrefine.pipeline import prepare_run
from hetrefine.simulate import SimulationSpec, simulate_dataset
from hetrefine.steps import settings_for
from hetrefine.steps.align import align_chunks, align_shard


@pytest.mark.parametrize("self_evidence", [False, True])
def test_shared_job_gives_the_per_chunk_results(tmp_path, self_evidence):
    spec = SimulationSpec(n_particles=300, box=24, snr=0.3, domain_fraction=0.3, seed=5)
    simulate_dataset(spec, tmp_path / "data")
    cfg = defaults()
    cfg.update(iterations=1, shard_size=100, device="cpu", self_evidence_correction=self_evidence)
    models = [str(tmp_path / "data" / f"initial_model_{k:02d}.mrc") for k in (1, 2)]
    run = prepare_run(str(tmp_path / "data" / "particles.star"), models, str(tmp_path / "r"), cfg)
    chunks = [c for shard in run.chunks for c in shard]
    assert len(chunks) == 3
    common = (run.references(0), run.model(0), run.mask, run.focus_mask, 1)
    settings = settings_for("align", cfg)
    align_chunks(chunks, *common[:4], [], common[4], str(tmp_path / "job.npz"), str(tmp_path / "job.sums.npz"),
                 settings, "cpu")  # fmt: skip
    # the per-chunk path: each chunk aligned with its own references, grids and masks
    total, parts = run_files.SumsTotal(), []
    for c, chunk in enumerate(chunks):
        parts.append(str(tmp_path / f"chunk_{c}.npz"))
        align_shard(chunk, *common, parts[-1], total, settings, "cpu")
    total.write(tmp_path / "chunks.sums.npz")
    got = run_files.read_assignments(tmp_path / "job.npz")
    want = run_files.merge_assignments(parts)
    assert sorted(got) == sorted(want)
    assert len(got["index"]) == 300
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    s_got = run_files.read_sums(tmp_path / "job.sums.npz")
    s_want = run_files.read_sums(tmp_path / "chunks.sums.npz")
    np.testing.assert_array_equal(s_got["num"], s_want["num"])
    np.testing.assert_array_equal(s_got["wgt"], s_want["wgt"])
    assert np.abs(s_got["wgt"]).sum() > 0
