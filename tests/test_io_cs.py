"""CryoSPARC .cs reading (vs pyem's csparc2star and the RELION STAR of the same particles) and writing."""

from __future__ import annotations

import numpy as np
import pytest

from hetrefine.errors import InputError
from hetrefine.io.cs import load_cs, read_cs_table, write_particles_cs
from hetrefine.io.particles import read_particles
from hetrefine.io.stacks import read_images
from hetrefine.rotations import euler_to_matrix


def test_empiar_cs_matches_star_and_pyem(interop):
    d = interop / "cryodrgn"
    cs = read_particles(d / "empiar_10076_7.cs")
    star = read_particles(d / "empiar_10076_7.star")
    pyem = read_particles(
        interop / "pyem_csparc2star/empiar_10076_7_csparc2star.star", project_dir=d
    )
    for other in (star, pyem):
        for col in (
            "rlnDefocusU",
            "rlnDefocusV",
            "rlnDefocusAngle",
            "rlnVoltage",
            "rlnSphericalAberration",
            "rlnAmplitudeContrast",
            "rlnImagePixelSize",
        ):
            np.testing.assert_allclose(cs[col], other[col], rtol=1e-5, atol=1e-3, err_msg=col)
        assert cs["hr_stack"].tolist() == other["hr_stack"].tolist()
        assert cs["hr_index"].tolist() == other["hr_index"].tolist()
    assert (cs["rlnOpticsGroup"] == 24).all() and (pyem["rlnOpticsGroup"] == 24).all()
    assert "ctf/df1_A" in cs.columns and "blob/shape/1" in cs.columns  # input fields kept
    np.testing.assert_array_equal(read_images(cs.iloc[:3]), read_images(star.iloc[:3]))


def test_alignments3d_match_pyem(interop):
    cs = read_cs_table(interop / "cryodrgn/cryosparc_P12_J24_001_particles.cs")
    pyem = read_particles(
        interop / "pyem_csparc2star/cryosparc_P12_J24_001_particles_csparc2star.star",
        check_images=False,
    )
    angles = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
    a = euler_to_matrix(cs[angles].to_numpy())
    b = euler_to_matrix(pyem[angles].to_numpy())
    assert np.abs(a - b).max() < 1e-4
    for col in ("rlnOriginXAngst", "rlnOriginYAngst", "rlnDefocusU", "rlnDefocusAngle"):
        np.testing.assert_allclose(cs[col], pyem[col], atol=2e-3, err_msg=col)
    for col in ("rlnClassNumber", "rlnRandomSubset", "rlnOpticsGroup"):
        assert cs[col].tolist() == pyem[col].tolist(), col
    assert cs["rlnImageName"].iloc[0].split("@")[1] == pyem["rlnImageName"].iloc[0].split("@")[1]


def test_cs_write_read_round_trip(interop, tmp_path):
    t = read_particles(interop / "cryodrgn/empiar_10076_7.cs")
    rng = np.random.default_rng(3)
    t["rlnAngleRot"] = rng.uniform(-180, 180, len(t))
    t["rlnAngleTilt"] = rng.uniform(1, 179, len(t))
    t["rlnAnglePsi"] = rng.uniform(-180, 180, len(t))
    t["rlnOriginXAngst"] = rng.normal(size=len(t)) * 3
    t["rlnOriginYAngst"] = rng.normal(size=len(t)) * 3
    t["rlnClassNumber"] = rng.integers(1, 4, len(t))
    write_particles_cs(tmp_path / "out.cs", t)
    # blob/path is the input's own (relative to the input's folder), as every input field
    back = read_particles(tmp_path / "out.cs", project_dir=interop / "cryodrgn")
    for col in (
        "rlnDefocusU",
        "rlnDefocusV",
        "rlnDefocusAngle",
        "rlnPhaseShift",
        "rlnVoltage",
        "rlnImagePixelSize",
        "rlnOriginXAngst",
        "rlnOriginYAngst",
    ):
        np.testing.assert_allclose(back[col], t[col], rtol=1e-5, atol=1e-3, err_msg=col)
    assert back["hr_stack"].tolist() == t["hr_stack"].tolist()
    assert back["hr_index"].tolist() == t["hr_index"].tolist()
    assert back["rlnOpticsGroup"].tolist() == t["rlnOpticsGroup"].tolist()
    assert back["rlnClassNumber"].tolist() == t["rlnClassNumber"].tolist()
    angles = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
    err = euler_to_matrix(back[angles].to_numpy()) - euler_to_matrix(t[angles].to_numpy())
    assert np.abs(err).max() < 1e-5
    # CryoSPARC's dtypes (as in its own refinement output), and the input fields kept
    real = load_cs(interop / "cryodrgn/cryosparc_P12_J24_001_particles.cs")
    out = load_cs(tmp_path / "out.cs")
    for f in ("pose", "shift", "psize_A", "class"):
        assert out.dtype[f"alignments3D/{f}"] == real.dtype[f"alignments3D/{f}"], f
    src = load_cs(interop / "cryodrgn/empiar_10076_7.cs")
    for f in src.dtype.names:
        assert np.array_equal(out[f], src[f]), f


def test_bad_cs_files(tmp_path):
    (tmp_path / "x.cs").write_bytes(b"not numpy")
    with pytest.raises(InputError, match="not a CryoSPARC"):
        load_cs(tmp_path / "x.cs")
    np.save(tmp_path / "plain.npy", np.zeros(3))
    (tmp_path / "plain.npy").rename(tmp_path / "plain.cs")
    with pytest.raises(InputError, match="structured"):
        read_particles(tmp_path / "plain.cs")
    arr = np.zeros(2, dtype=[("blob/path", "S8"), ("blob/idx", "<u4"), ("ctf/df1_A", "<f4")])
    with open(tmp_path / "few.cs", "wb") as fh:
        np.save(fh, arr)
    with pytest.raises(InputError, match="missing .cs field.*ctf/df2_A"):
        read_particles(tmp_path / "few.cs")
