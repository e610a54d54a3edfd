"""RELION 3.1 itself as the oracle: our STAR files open in RELION, RELION's files open in ours.

Skipped when RELION is not on PATH.
"""

from __future__ import annotations

import subprocess

import mrcfile
import numpy as np
import pandas as pd
import pytest
from conftest import requires_relion

from hetrefine.io.mrc import write_mrc
from hetrefine.io.particles import read_particles
from hetrefine.io.stacks import read_images
from hetrefine.io.star import read_star_blocks, write_particles_star

pytestmark = [requires_relion, pytest.mark.relion]


def _run(args, cwd):
    res = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"{args[0]} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    return res.stdout + res.stderr


@pytest.fixture
def relion_projections(tmp_path):
    """A 24^3 blob volume projected by relion_project (CTF on) at 12 random poses."""
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[-12:12, -12:12, -12:12]
    vol = np.exp(-((x - 3) ** 2 + y**2 + (z + 2) ** 2) / 20.0) + 0.5 * np.exp(
        -((x + 4) ** 2 + (y - 3) ** 2 + z**2) / 8.0
    )
    write_mrc(tmp_path / "vol.mrc", vol, 4.0)
    n = 12
    ang = pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1:06d}@dummy.mrcs" for i in range(n)],
            "rlnAngleRot": rng.uniform(-180, 180, n),
            "rlnAngleTilt": rng.uniform(0, 180, n),
            "rlnAnglePsi": rng.uniform(-180, 180, n),
            "rlnOriginXAngst": 0.0,
            "rlnOriginYAngst": 0.0,
            "rlnDefocusU": rng.uniform(10000, 20000, n),
            "rlnDefocusV": 15000.0,
            "rlnDefocusAngle": 30.0,
            "rlnVoltage": 300.0,
            "rlnSphericalAberration": 2.7,
            "rlnAmplitudeContrast": 0.1,
            "rlnImagePixelSize": 4.0,
            "rlnImageSize": 24,
            "rlnOpticsGroup": 1,
        }
    )
    write_particles_star(tmp_path / "ang.star", ang, image_names="keep")
    _run(
        ["relion_project", "--i", "vol.mrc", "--o", "proj", "--ang", "ang.star", "--ctf"], tmp_path
    )
    return tmp_path, ang


def test_relion_project_output_reads(relion_projections):
    d, ang = relion_projections
    t = read_particles(d / "proj.star")
    assert len(t) == 12
    assert (t["rlnImagePixelSize"] == 4.0).all() and (t["rlnImageSize"] == 24).all()
    np.testing.assert_allclose(t["rlnDefocusU"], ang["rlnDefocusU"], atol=1e-3)
    np.testing.assert_allclose(t["rlnAngleTilt"], ang["rlnAngleTilt"], atol=1e-3)
    imgs = read_images(t)
    with mrcfile.open(d / "proj.mrcs") as m:
        np.testing.assert_array_equal(imgs, m.data)
        assert m.voxel_size.x == pytest.approx(4.0)
    assert imgs.std(axis=(1, 2)).min() > 0  # real projections, not blank


def test_our_star_opens_in_relion(relion_projections, tmp_path_factory):
    d, _ = relion_projections
    t = read_particles(d / "proj.star")
    t["hr_note"] = "internal"
    t["rlnClassNumber"] = np.arange(len(t)) % 2 + 1
    out = tmp_path_factory.mktemp("ours")  # another folder: absolute image names needed
    write_particles_star(out / "ours.star", t)
    log = _run(
        [
            "relion_star_handler",
            "--i",
            "ours.star",
            "--o",
            "checked.star",
            "--check_duplicates",
            "rlnImageName",
        ],
        out,
    )
    assert "duplicate" not in log.lower() or "0 duplicate" in log.lower()
    back = read_star_blocks(out / "checked.star")
    assert len(back["particles"]) == len(t)
    np.testing.assert_allclose(back["particles"]["rlnDefocusU"], t["rlnDefocusU"], atol=1e-3)
    # RELION reads the images through our file: per-image statistics and a reconstruction
    _run(["relion_image_handler", "--i", "ours.star", "--o", "copy", "--stats"], out)
    _run(["relion_reconstruct", "--i", "ours.star", "--o", "rec.mrc", "--ctf"], out)
    with mrcfile.open(out / "rec.mrc") as m:
        assert m.data.shape == (24, 24, 24)
        assert np.isfinite(m.data).all() and m.data.std() > 0
        assert m.voxel_size.x == pytest.approx(4.0)
