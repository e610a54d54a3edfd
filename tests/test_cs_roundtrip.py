"""CryoSPARC files that round-trip: real CryoSPARC-written .cs files through our reader,
the run's metadata file and ``export.write_cs`` keep every input field and uid, gain
CryoSPARC's heterogeneous-refinement fields, and split into per-class files."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.transform import Rotation

from hetrefine.export import particles_with_classes, write_cs
from hetrefine.io import run_files
from hetrefine.io.cs import load_cs, read_cs_table
from hetrefine.io.particles import read_particles
from hetrefine.rotations import euler_to_matrix

CS_FILES = (
    "cryosparc_J2_particles_exported.cs",  # 2D classification output (alignments2D)
    "cryosparc_P12_J24_001_particles.cs",  # refinement output (alignments3D)
    "empiar_10076_7.cs",  # imported particles (blob, ctf)
)
REPLACED = re.compile(r"^(alignments3D|alignments_class_\d+)/")
K = 3


def _assignments(n: int, k: int = K, seed: int = 0, scale: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    post = rng.dirichlet(np.full(k, 0.3), n).astype(np.float32)
    a = {
        "half": rng.integers(0, 2, n),
        "posterior": post,
        "euler": rng.uniform([-180, 0, -180], [180, 180, 180], (n, k, 3)).astype(np.float32),
        "shift": rng.normal(0, 3, (n, k, 2)).astype(np.float32),
        "loglik": rng.normal(size=(n, k)).astype(np.float32),
        "pose_peak": np.ones((n, k), np.float32),
    }
    if scale:
        a["scale"] = rng.uniform(0.5, 1.5, (n, k)).astype(np.float32)
    return a


def _export(table: pd.DataFrame, assign: dict, out) -> tuple[np.ndarray, list[np.ndarray]]:
    """``write_cs`` as the write_classes step calls it, on the table after the run's
    metadata file (``preprocess/metadata.npz``); the written all/class arrays."""
    run_files.write_metadata(out / "metadata.npz", table)
    table = run_files.read_metadata(out / "metadata.npz")
    dirs = [out / f"class_{k + 1:03d}" for k in range(assign["posterior"].shape[1])]
    paths = write_cs(
        out / "particles_all.cs", table, particles_with_classes(table, assign), assign, dirs
    )
    assert paths == [out / "particles_all.cs"] + [d / "particles.cs" for d in dirs]
    return load_cs(paths[0]), [load_cs(p) for p in paths[1:]]


@pytest.mark.parametrize("name", CS_FILES)
def test_every_input_field_and_uid_survives(interop, tmp_path, name):
    src = load_cs(interop / "cryodrgn" / name)
    table = read_particles(interop / "cryodrgn" / name, check_images=False)
    assign = _assignments(len(src))
    out, classes = _export(table, assign, tmp_path)
    kept = [f for f in src.dtype.names if not REPLACED.match(f)]
    for f in kept:
        assert f in out.dtype.names, f
        assert np.array_equal(out[f], src[f]), f
        if src.dtype[f].kind != "S":  # text: same bytes, width of the longest value
            assert out.dtype[f] == src.dtype[f], f
    assert out["uid"].tolist() == src["uid"].tolist()
    assert out.dtype.names[: len(kept)] == tuple(kept)  # input order first
    # the input's own alignments3D (a previous job's poses) is replaced, not mixed in
    stale = {f for f in src.dtype.names if REPLACED.match(f)} - set(out.dtype.names)
    assert stale <= {f"alignments3D/{x}" for x in ("alpha", "class_ess", "cross_cor", "error",
                     "error_min", "image_pow", "pose_ess", "resid_pow", "shift_ess",
                     "slice_pow", "weight")}  # fmt: skip
    # per-class files: the hard assignment partitions the particles, rows as in the all-file
    best = assign["posterior"].argmax(1)
    assert np.array_equal(out["alignments3D/class"], best)
    for k, c in enumerate(classes):
        assert c.dtype == out.dtype
        assert np.array_equal(c, out[best == k])
    assert sorted(np.concatenate([c["uid"] for c in classes]).tolist()) == sorted(
        src["uid"].tolist()
    )


def test_field_order_and_missing_uid(interop, tmp_path):
    """Input fields come back in the input's order (uid where it was); a .cs without
    uids gets 0..N-1."""
    src = load_cs(interop / "cryodrgn/empiar_10076_7.cs")
    names = [f for f in src.dtype.names if f != "uid"]
    for order, want_uid in ((names + ["uid"], src["uid"]), (names, np.arange(len(src)))):
        arr = np.zeros(len(src), dtype=[(f, src.dtype[f]) for f in order])
        for f in order:
            arr[f] = src[f]
        with open(tmp_path / "in.cs", "wb") as fh:
            np.save(fh, arr)
        table = read_particles(tmp_path / "in.cs", check_images=False)
        out, _ = _export(table, _assignments(len(src)), tmp_path)
        want = order if "uid" in order else ["uid", *order]
        assert out.dtype.names[: len(want)] == tuple(want)
        assert out["uid"].tolist() == want_uid.tolist()
        for f in names:
            assert np.array_equal(out[f], src[f]), f


def test_hetero_fields_named_and_typed_as_cryosparc(interop, tmp_path):
    """Our alignments3D / alignments_class_k fields carry the names, dtypes and shapes of a
    real CryoSPARC refinement's alignments3D fields, and the values of the assignments."""
    real = load_cs(interop / "cryodrgn/cryosparc_P12_J24_001_particles.cs")
    table = read_particles(interop / "cryodrgn/empiar_10076_7.cs", check_images=False)
    assign = _assignments(len(table), scale=True)
    out, _ = _export(table, assign, tmp_path)
    psize = table["rlnImagePixelSize"].to_numpy()
    names = ("pose", "shift", "psize_A", "split", "class", "class_posterior", "alpha")
    best = assign["posterior"].argmax(1)
    rows = np.arange(len(table))
    for prefix, cls in [("alignments3D", best)] + [
        (f"alignments_class_{k}", np.full(len(table), k)) for k in range(K)
    ]:
        for x in names:
            assert out.dtype[f"{prefix}/{x}"] == real.dtype[f"alignments3D/{x}"], (prefix, x)
        mats = Rotation.from_rotvec(out[f"{prefix}/pose"]).as_matrix().transpose(0, 2, 1)
        np.testing.assert_allclose(mats, euler_to_matrix(assign["euler"][rows, cls]), atol=2e-6)
        np.testing.assert_allclose(
            out[f"{prefix}/shift"], assign["shift"][rows, cls] / psize[:, None], rtol=1e-6
        )
        np.testing.assert_array_equal(out[f"{prefix}/class"], cls)
        np.testing.assert_array_equal(out[f"{prefix}/split"], assign["half"])
        np.testing.assert_array_equal(
            out[f"{prefix}/class_posterior"], assign["posterior"][rows, cls]
        )
        np.testing.assert_array_equal(out[f"{prefix}/alpha"], assign["scale"][rows, cls])
        np.testing.assert_allclose(out[f"{prefix}/psize_A"], psize)


def test_our_cs_reads_back_as_the_star(interop, tmp_path):
    """Read back by our own .cs reader, particles_all.cs says what particles_all.star says."""
    table = read_particles(
        interop / "cryodrgn/cryosparc_P12_J24_001_particles.cs", check_images=False
    )
    assign = _assignments(len(table), seed=2)
    df = particles_with_classes(table, assign)
    _export(table, assign, tmp_path)
    back = read_cs_table(tmp_path / "particles_all.cs")
    for col in ("rlnClassNumber", "rlnRandomSubset"):
        assert back[col].tolist() == df[col].tolist(), col
    for col in ("rlnOriginXAngst", "rlnOriginYAngst", "rlnDefocusU", "rlnDefocusAngle"):
        np.testing.assert_allclose(back[col], df[col], atol=1e-3, err_msg=col)
    angles = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
    err = euler_to_matrix(back[angles].to_numpy()) - euler_to_matrix(df[angles].to_numpy())
    assert np.abs(err).max() < 1e-5
    assert back["rlnImageName"].tolist() == table["rlnImageName"].tolist()


def test_star_input_builds_cs_from_star_columns(interop, tmp_path):
    """From RELION STAR: uids 0..N-1, blob/path as the STAR names the stack, CTF converted."""
    star = interop / "cryodrgn/empiar_10076_7.star"
    table = read_particles(star)
    out, classes = _export(table, _assignments(len(table), k=2, seed=1), tmp_path)
    assert out["uid"].tolist() == list(range(len(table)))
    assert [p.decode() for p in out["blob/path"]] == [
        s.split("@", 1)[1] for s in table["rlnImageName"]
    ]
    assert out["blob/idx"].tolist() == table["hr_index"].tolist()
    np.testing.assert_allclose(out["ctf/df1_A"], table["rlnDefocusU"], rtol=1e-6)
    np.testing.assert_allclose(
        np.degrees(out["ctf/df_angle_rad"]), table["rlnDefocusAngle"], atol=1e-3
    )
    assert (out["ctf/exp_group_id"] == table["rlnOpticsGroup"] - 1).all()
    # the same particles as the CryoSPARC-written file, CTF for CTF
    cs = load_cs(interop / "cryodrgn/empiar_10076_7.cs")
    for f in ("ctf/df1_A", "ctf/df2_A", "ctf/accel_kv", "ctf/cs_mm", "blob/psize_A"):
        np.testing.assert_allclose(out[f], cs[f], rtol=1e-5, err_msg=f)
        assert out.dtype[f] == cs.dtype[f], f
    assert sorted(np.concatenate([c["uid"] for c in classes]).tolist()) == list(range(len(table)))


def test_empty_class_gets_an_empty_cs(interop, tmp_path):
    table = read_particles(interop / "cryodrgn/empiar_10076_7.cs", check_images=False)
    assign = _assignments(len(table))
    assign["posterior"][:, 1] = 0.0  # nobody in class 2
    assign["posterior"] /= assign["posterior"].sum(1, keepdims=True)
    out, classes = _export(table, assign, tmp_path)
    assert len(classes[1]) == 0 and classes[1].dtype == out.dtype
    assert len(classes[0]) + len(classes[2]) == len(out)


def test_cryosparc_tools_reads_what_we_write(interop, tmp_path):
    """CryoSPARC's own library (cryosparc-tools) loads our files with the fields and uids."""
    dataset = pytest.importorskip("cryosparc.dataset")
    src = load_cs(interop / "cryodrgn/empiar_10076_7.cs")
    table = read_particles(interop / "cryodrgn/empiar_10076_7.cs", check_images=False)
    assign = _assignments(len(table))
    out, classes = _export(table, assign, tmp_path)
    ds = dataset.Dataset.load(tmp_path / "particles_all.cs")
    assert len(ds) == len(src)
    assert ds["uid"].tolist() == src["uid"].tolist()
    for f in src.dtype.names:
        assert np.array_equal(np.asarray(ds[f]), src[f]) or src.dtype[f].kind == "S", f
    assert [str(x) for x in ds["blob/path"]] == [x.decode() for x in src["blob/path"]]
    assert set(ds.prefixes()) >= {"blob", "ctf", "alignments3D"} | {
        f"alignments_class_{k}" for k in range(K)
    }
    np.testing.assert_array_equal(
        ds["alignments_class_1/class_posterior"], assign["posterior"][:, 1]
    )
    for k in range(K):
        part = dataset.Dataset.load(tmp_path / f"class_{k + 1:03d}/particles.cs")
        assert part["uid"].tolist() == out["uid"][out["alignments3D/class"] == k].tolist()
