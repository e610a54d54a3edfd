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
