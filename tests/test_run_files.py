"""The run's files: one layout, readers that check what they read, and no pickles."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from hetrefine.errors import InputError
from hetrefine.io import run_files
from hetrefine.io.run_files import RunLayout


def test_layout_formats_numbers_and_passes_wildcards():
    layout = RunLayout("results/r")
    assert layout.assignments(3, 12) == "results/r/iter_003/align/shard_0012.npz"
    assert layout.sums("{it}", "{s}") == "results/r/iter_{it}/align/shard_{s}.sums.npz"
    assert layout.references(0) == "results/r/iter_000/references.npz"
    assert layout.class_dir(2) == "results/r/class_002" and layout.metadata.endswith("metadata.npz")


def test_metadata_round_trips_exactly_without_pickle(tmp_path):
    table = pd.DataFrame(
        {
            "rlnImageName": ["000001@my data/s.mrcs", "000002@Ünïcode/s.mrcs"],
            "rlnDefocusU": [12345.678901234, 23456.5],
            "rlnOpticsGroup": np.array([1, 2], np.int64),
            "hr_index": np.array([0, 1], np.int64),
        }
    )
    p = tmp_path / "metadata.npz"
    run_files.write_metadata(p, table)
    back = run_files.read_metadata(p)
    pd.testing.assert_frame_equal(back, table, check_dtype=False)
    assert back["rlnDefocusU"].tolist() == table["rlnDefocusU"].tolist()  # exact
    with np.load(p, allow_pickle=False) as f:  # plain arrays: loads without pickle
        assert {f[k].dtype.kind for k in f.files} <= {"U", "f", "i"}


def test_a_pickled_file_is_refused_not_executed(tmp_path):
    p = tmp_path / "metadata.npz"
    np.savez(p, __columns__=np.array(["a"]), c0=np.array([{"x": 1}], dtype=object))
    with pytest.raises(InputError, match="cannot read particle metadata"):
        run_files.read_metadata(p)


def test_assignment_shapes_checked_on_read(tmp_path):
    p = tmp_path / "a.npz"
    n, k = 4, 2
    good = dict(
        index=np.arange(n), half=np.zeros(n, np.int8), posterior=np.full((n, k), 0.5, np.float32),
        euler=np.zeros((n, k, 3)), shift=np.zeros((n, k, 2)), loglik=np.zeros((n, k)),
        pose_peak=np.ones((n, k)),
    )  # fmt: skip
    run_files.write_assignments(p, **good)
    assert run_files.read_assignments(p)["posterior"].shape == (n, k)
    np.savez(p, **{**good, "euler": np.zeros((n, k, 2))})
    with pytest.raises(InputError, match="'euler' must have shape"):
        run_files.read_assignments(p)


def test_merged_chunks_sum_the_noise_per_optics_group(tmp_path):
    """A shard streamed in chunks: the per-particle arrays are concatenated, but the
    residual noise power and counts (pooled and per optics group) are summed: a
    concatenation of the (groups, shells) arrays would double the groups."""
    rng = np.random.default_rng(0)
    parts, n_sh, groups = [], 5, 2
    for c, n in enumerate((3, 4)):
        arrays = {
            "index": np.arange(n) + 10 * c,
            "half": np.zeros(n, np.int8),
            "posterior": np.full((n, 2), 0.5),
            "euler": np.zeros((n, 2, 3)),
            "shift": np.zeros((n, 2, 2)),
            "loglik": np.zeros((n, 2)),
            "pose_peak": np.zeros((n, 2)),
            "noise_power": rng.random(n_sh),
            "noise_count": np.full(n_sh, 1.0 + c),
            "noise_power_groups": rng.random((groups, n_sh)),
            "noise_count_groups": np.full((groups, n_sh), 2.0 + c),
        }
        parts.append(tmp_path / f"c{c}.npz")
        run_files.write_assignments(parts[-1], **arrays)
    merged = run_files.merge_assignments(parts)
    a, b = (run_files.read_assignments(p) for p in parts)
    assert merged["posterior"].shape == (7, 2)
    for key in ("noise_power", "noise_count", "noise_power_groups", "noise_count_groups"):
        assert merged[key].shape == a[key].shape
        np.testing.assert_allclose(merged[key], a[key] + b[key])
