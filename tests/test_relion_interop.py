"""Our final outputs open in RELION 3.1: STAR files, maps, and poses RELION reconstructs from.

Skipped when the RELION programs are not on PATH.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from hetrefine import export
from hetrefine.rotations import matrix_to_euler, random_rotations

pytestmark = [
    pytest.mark.relion,
    pytest.mark.skipif(
        shutil.which("relion_star_handler") is None or shutil.which("relion_reconstruct") is None,
        reason="RELION 3.1 programs not on PATH (apt-get install relion)",
    ),
]

K, D, PX = 2, 24, 3.0


def _run(args: list[str], cwd) -> subprocess.CompletedProcess:
    res = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, (
        f"{' '.join(args)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    )
    return res


def _phantom(d: int) -> np.ndarray:
    """An asymmetric blob phantom (z, y, x), so a wrong pose gives a different map."""
    z, y, x = np.mgrid[:d, :d, :d].astype(np.float64) - d // 2
    v = np.zeros((d, d, d))
    for cz, cy, cx, w, a in [
        (0, 0, 0, 3.0, 1.0),
        (4, -3, 1, 2.0, 0.8),
        (-2, 4, -4, 1.6, 0.7),
        (1, 1, 6, 1.4, 0.6),
    ]:
        v += a * np.exp(-((z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2) / (2 * w**2))
    return v.astype(np.float32)


def _table(names: list[str]) -> pd.DataFrame:
    n = len(names)
    return pd.DataFrame(
        {
            "rlnImageName": names,
            "rlnDefocusU": 15000.0,
            "rlnDefocusV": 15000.0,
            "rlnDefocusAngle": 0.0,
            "rlnVoltage": 300.0,
            "rlnSphericalAberration": 2.7,
            "rlnAmplitudeContrast": 0.1,
            "rlnPhaseShift": 0.0,
            "rlnCtfBfactor": 0.0,
            "rlnImagePixelSize": PX,
            "rlnImageSize": D,
            "rlnOpticsGroup": 1,
            "hr_stack": "proj.mrcs",
            "hr_index": np.arange(n),
        }
    )


def _assign(n: int, rng: np.random.Generator) -> dict:
    post = np.zeros((n, K), np.float32)
    post[:, 0] = np.where(np.arange(n) % 4 == 3, 0.1, 0.9)  # 3/4 in class 1
    post[:, 1] = 1 - post[:, 0]
    return {
        "half": (np.arange(n) % 2).astype(np.int8),
        "posterior": post,
        "euler": matrix_to_euler(random_rotations(n * K, rng)).reshape(n, K, 3).astype(np.float32),
        "shift": np.zeros((n, K, 2), np.float32),
        "loglik": rng.normal(-500, 10, (n, K)).astype(np.float32),
        "pose_peak": np.ones((n, K), np.float32),
    }


def _write(tmp_path, table, assign, maps):
    refs = np.stack([maps, maps], axis=1)
    s = np.arange(D // 2 + 1)
    fsc = [np.clip(1 - s / 8.0, 0, 1)] * K
    export.write_final_outputs(
        table,
        assign,
        refs,
        None,
        np.ones((D, D, D), np.float32),
        fsc,
        PX,
        tmp_path,
    )


def test_star_files_and_maps_open_in_relion(tmp_path):
    rng = np.random.default_rng(0)
    n = 40
    table = _table([f"{i + 1:06d}@proj.mrcs" for i in range(n)])
    assign = _assign(n, rng)
    assign["posterior"][:, 0] = 1.0  # class 2 empty: its STAR has no rows
    assign["posterior"][:, 1] = 0.0
    maps = np.stack([_phantom(D), _phantom(D)[::-1].copy()])
    _write(tmp_path, table, assign, maps)

    for rel in ("particles_all.star", "class_001/particles.star"):
        res = _run(["relion_star_handler", "--i", rel, "--o", "tmp.star"], tmp_path)
        back = starfile.read(tmp_path / "tmp.star", always_dict=True)["particles"]
        assert len(back) == n
        # RELION keeps our extra posterior columns (it warns and maintains unknown labels)
        assert "hrClassPosterior_001" in back.columns, res.stdout
        np.testing.assert_allclose(back["rlnAngleTilt"], assign["euler"][:, 0, 1], atol=1e-4)
    # an empty class STAR is read as zero particles, not an error
    _run(["relion_star_handler", "--i", "class_002/particles.star", "--o", "empty.star"], tmp_path)

    for k in range(K):
        for name in ("map.mrc", "map_half_A.mrc", "map_half_B.mrc"):
            res = _run(
                ["relion_image_handler", "--i", f"class_{k + 1:03d}/{name}", "--stats"], tmp_path
            )
            m = re.search(
                r"\(x,y,z,n\)=\s*(\d+) x (\d+) x (\d+) x (\d+).*angpix = ([\d.]+)", res.stdout
            )
            assert m, res.stdout
            assert tuple(int(g) for g in m.groups()[:4]) == (D, D, D, 1)
            assert float(m.group(5)) == pytest.approx(PX)
    _run(["relion_image_handler", "--i", "class_001/mask.mrc", "--stats"], tmp_path)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    """Correlation inside a sphere after removing each map's spherical average.

    The spherical average is what a reconstruction with random poses gets
    right; without it the correlation of a compact phantom with a blurred
    ball is already high.
    """
    d = a.shape[0]
    z, y, x = np.mgrid[:d, :d, :d] - d // 2
    r = np.rint(np.sqrt(z**2 + y**2 + x**2)).astype(int)
    inside = r < 0.4 * d

    def aniso(v: np.ndarray) -> np.ndarray:
        prof = np.bincount(r.ravel(), v.ravel()) / np.bincount(r.ravel())
        return (v - prof[r])[inside]

    return float(np.corrcoef(aniso(a), aniso(b))[0, 1])


def _ang_star(path, euler: np.ndarray, shift_A: np.ndarray) -> None:
    """A RELION 3.1 STAR of poses and Angstrom origins for ``relion_project --ang``."""
    lines = ["", "# version 30001", "", "data_optics", "", "loop_"]
    lines += [
        f"_{c} #{i + 1}"
        for i, c in enumerate(
            [
                "rlnOpticsGroup",
                "rlnOpticsGroupName",
                "rlnVoltage",
                "rlnSphericalAberration",
                "rlnAmplitudeContrast",
                "rlnImagePixelSize",
                "rlnImageSize",
                "rlnImageDimensionality",
            ]
        )
    ]
    lines += [
        f"1 opticsGroup1 300 2.7 0.1 {PX} {D} 2",
        "",
        "",
        "# version 30001",
        "",
        "data_particles",
        "",
        "loop_",
    ]
    lines += [
        f"_{c} #{i + 1}"
        for i, c in enumerate(
            [
                "rlnAngleRot",
                "rlnAngleTilt",
                "rlnAnglePsi",
                "rlnOriginXAngst",
                "rlnOriginYAngst",
                "rlnOpticsGroup",
            ]
        )
    ]
    lines += [
        " ".join(f"{v:.6f}" for v in (*e, *s)) + " 1" for e, s in zip(euler, shift_A, strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.slow
def test_relion_reconstructs_our_class_star(tmp_path):
    """relion_project a phantom with known poses and shifts, give our writer those as the
    class-1 poses, and check relion_reconstruct from class_001/particles.star recovers the
    phantom; with negated shifts or random poses it must not (so the test can fail)."""
    vol = _phantom(D)
    with mrcfile.new(tmp_path / "vol.mrc") as m:
        m.set_data(vol)
        m.voxel_size = PX
    rng = np.random.default_rng(1)
    n = 400
    euler = matrix_to_euler(random_rotations(n, rng))
    shift = rng.uniform(-2.0, 2.0, (n, 2)) * PX  # up to 2 px, in Angstrom
    _ang_star(tmp_path / "ang.star", euler, shift)
    _run(
        [
            "relion_project",
            "--i",
            "vol.mrc",
            "--o",
            "proj",
            "--ang",
            "ang.star",
            "--angpix",
            str(PX),
        ],
        tmp_path,
    )
    proj = starfile.read(tmp_path / "proj.star", always_dict=True)["particles"]
    assert len(proj) == n
    truth_euler = proj[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(np.float32)
    truth_shift = proj[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(np.float32)
    np.testing.assert_allclose(truth_shift, shift, atol=1e-4)

    table = _table(list(proj["rlnImageName"]))
    maps = np.stack([vol, vol])
    corrs = {}
    for case in ("true", "negated_shift", "random_pose"):
        assign = _assign(n, rng)
        if case != "random_pose":
            assign["euler"][:, 0] = truth_euler
            assign["shift"][:, 0] = truth_shift if case == "true" else -truth_shift
        out = tmp_path / case
        _write(out, table, assign, maps)
        _run(
            [
                "relion_reconstruct",
                "--i",
                f"{case}/class_001/particles.star",
                "--o",
                f"{case}/rec.mrc",
            ],
            tmp_path,
        )
        with mrcfile.open(out / "rec.mrc") as m:
            rec = np.asarray(m.data, dtype=np.float64)
            assert m.voxel_size.x == pytest.approx(PX, rel=1e-3)
        corrs[case] = _corr(rec, vol)
    assert corrs["true"] > 0.9, corrs
    assert corrs["negated_shift"] < corrs["true"] - 0.2, corrs
    assert corrs["random_pose"] < 0.5, corrs
