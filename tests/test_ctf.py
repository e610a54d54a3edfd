"""CTF against RELION 3.1 itself, plus pure physics checks.

What was found (RELION 3.1.3, relion_project --ctf): the ratio of the centred 2D FFTs of
a projection with and without --ctf is exactly hetrefine's compute_ctf (max abs
difference ~1e-5) when
- the image is read by mrcfile as [y, x], transformed with fftshift(fft2(ifftshift(img)))
  so that zero frequency sits at index D//2, kx runs along columns and ky along rows;
- phi = atan2(ky, kx) and the defocus along phi is (dU+dV)/2 + (dU-dV)/2 cos 2(phi - angle);
- chi = -pi lambda defocus k^2 + pi/2 Cs lambda^3 k^4 - phase - atan(Q/sqrt(1-Q^2)),
  CTF = -sin(chi) exp(-B k^2 / 4): the defocus term has a minus sign (RELION builds its
  astigmatism matrix from -dU, -dV); the first CTF lobe is positive for underfocus.
  (The first version of ctf.py had the opposite sign on the defocus and Cs terms: it
  anticorrelated with RELION at phase shift 0.)
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from hetrefine.backend import to_device, to_host
from hetrefine.ctf import CTF_FIELDS, compute_ctf, electron_wavelength

needs_relion_project = pytest.mark.skipif(
    shutil.which("relion_project") is None, reason="relion_project not on PATH"
)


def _params(du, dv, ang, kv=300.0, cs=2.7, q=0.1, phase=0.0, b=0.0) -> np.ndarray:
    return np.array([[du, dv, ang, kv, cs, q, phase, b]], dtype=np.float64)


def test_fields():
    assert CTF_FIELDS[:3] == ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")
    assert len(CTF_FIELDS) == 8 and CTF_FIELDS[6] == "rlnPhaseShift"


def test_wavelength():
    assert electron_wavelength(300.0) == pytest.approx(0.019687, abs=2e-6)
    assert electron_wavelength(200.0) == pytest.approx(0.025079, abs=2e-6)
    assert electron_wavelength(100.0) == pytest.approx(0.037013, abs=2e-6)


def test_zero_frequency(xp):
    """CTF(0) = sin(atan(Q/sqrt(1-Q^2)) + phase) = Q at phase 0, whatever the defocus."""
    p = np.concatenate(
        [
            _params(10000, 8000, 20, q=0.07),
            _params(5000, 5000, 0, q=0.1, phase=90),
            _params(20000, 1000, 45, q=0.0),
        ]
    )
    k0 = np.zeros(1)
    c = to_host(compute_ctf(to_device(p, xp), to_device(k0, xp), to_device(k0, xp)))
    assert c.shape == (3, 1) and c.dtype == np.float32
    expect = np.sin(np.arcsin(p[:, 5]) + np.deg2rad(p[:, 6]))
    np.testing.assert_allclose(c[:, 0], expect, atol=1e-6)
    np.testing.assert_allclose(c[0, 0], 0.07, atol=1e-6)


def test_zeros_and_first_lobe_cs0(xp):
    """Cs=0, Q=0, no astigmatism: CTF = sin(pi lambda df k^2), zeros at k^2 = n / (lambda df)."""
    df = 15000.0
    lam = electron_wavelength(300.0)
    n = np.arange(1, 6)
    kz = np.sqrt(n / (lam * df))
    p = _params(df, df, 0, cs=0.0, q=0.0)
    for ang in (0.0, 1.0, 2.3):  # any direction
        kx, ky = kz * np.cos(ang), kz * np.sin(ang)
        c = to_host(compute_ctf(to_device(p, xp), to_device(kx, xp), to_device(ky, xp)))
        np.testing.assert_allclose(c[0], 0.0, atol=1e-4)
    # between zero 0 and 1 the CTF is positive for underfocus (RELION's sign); peak 1
    kpk = np.sqrt(0.5 / (lam * df))
    c = to_host(
        compute_ctf(to_device(p, xp), to_device(np.array([kpk]), xp), to_device(np.zeros(1), xp))
    )
    np.testing.assert_allclose(c[0, 0], 1.0, atol=1e-5)


def test_astigmatism_direction_and_bfactor(xp):
    """Along phi = angle the defocus is dU, along angle + 90 deg it is dV; B is exp(-B k^2/4)."""
    k = np.linspace(0.0, 0.3, 50)
    ang = 35.0
    astig = _params(12000, 8000, ang)
    for phi, df in ((ang, 12000), (ang + 90.0, 8000), (ang + 180.0, 12000)):
        kx, ky = k * np.cos(np.deg2rad(phi)), k * np.sin(np.deg2rad(phi))
        a = to_host(compute_ctf(to_device(astig, xp), to_device(kx, xp), to_device(ky, xp)))
        iso = to_host(
            compute_ctf(to_device(_params(df, df, 0), xp), to_device(kx, xp), to_device(ky, xp))
        )
        np.testing.assert_allclose(a, iso, atol=1e-5)
    kx, ky = k, np.zeros_like(k)
    c0 = compute_ctf(_params(9000, 9000, 0), kx, ky)
    cb = compute_ctf(_params(9000, 9000, 0, b=80.0), kx, ky)
    np.testing.assert_allclose(cb, c0 * np.exp(-80.0 * k**2 / 4), atol=1e-6)


# ---------------------------------------------------------------- against relion_project

# (defocus U, V, angle, phase shift, B-factor, optics group)
ROWS = [
    (8000.0, 6000.0, 30.0, 40.0, 20.0, 1),
    (12000.0, 11000.0, -70.0, 0.0, 0.0, 1),
    (5000.0, 5000.0, 0.0, 90.0, 50.0, 2),
    (15000.0, 9000.0, 110.0, 0.0, -10.0, 2),
    (20000.0, 19000.0, 80.0, 130.0, 0.0, 1),
]
OPTICS = {1: (300.0, 2.7, 0.1), 2: (200.0, 1.4, 0.07)}  # kV, Cs mm, Q


def _write_star(path: Path, apix: float, box: int, angles: np.ndarray | None = None) -> None:
    lines = ["", "data_optics", "", "loop_"]
    lines += [f"_rln{c}" for c in ("OpticsGroup", "OpticsGroupName", "Voltage", "SphericalAberration",
                                    "AmplitudeContrast", "ImagePixelSize", "ImageSize", "ImageDimensionality")]  # fmt: skip
    for g, (kv, cs, q) in OPTICS.items():
        lines.append(f"{g} og{g} {kv} {cs} {q} {apix} {box} 2")
    lines += ["", "data_particles", "", "loop_"]
    lines += [f"_rln{c}" for c in ("AngleRot", "AngleTilt", "AnglePsi", "DefocusU", "DefocusV",
                                    "DefocusAngle", "PhaseShift", "CtfBfactor", "OpticsGroup")]  # fmt: skip
    for i, (du, dv, ang, ph, b, g) in enumerate(ROWS):
        rot, tilt, psi = angles[i] if angles is not None else (0.0, 0.0, 0.0)
        lines.append(f"{rot} {tilt} {psi} {du} {dv} {ang} {ph} {b} {g}")
    path.write_text("\n".join(lines) + "\n")


def _relion_project(vol_path: Path, star: Path, out: Path, apix: float, ctf: bool) -> np.ndarray:
    cmd = [
        "relion_project",
        "--i",
        str(vol_path),
        "--o",
        str(out),
        "--ang",
        str(star),
        "--angpix",
        str(apix),
    ]
    if ctf:
        cmd.append("--ctf")
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=out.parent, timeout=120)
    assert res.returncode == 0, res.stdout[-1000:] + res.stderr[-1000:]
    return mrcfile.read(str(out) + ".mrcs").astype(np.float64)


def _centred_fft2(img: np.ndarray) -> np.ndarray:
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(img, axes=(-2, -1))), axes=(-2, -1))


def _freqs(box: int, apix: float) -> tuple[np.ndarray, np.ndarray]:
    k = (np.arange(box) - box // 2) / (box * apix)
    ky, kx = np.meshgrid(k, k, indexing="ij")
    return kx, ky


@needs_relion_project
def test_ctf_matches_relion_project(tmp_path):
    box, apix = 48, 2.0
    c = np.arange(box) - box // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    # a small Gaussian blob: its projection's transform is large out to Nyquist
    vol = np.exp(-(x**2 + y**2 + z**2) / 2.0).astype(np.float32)
    vol_path = tmp_path / "blob.mrc"
    with mrcfile.new(vol_path) as m:
        m.set_data(vol)
        m.voxel_size = apix
    star = tmp_path / "ang.star"
    _write_star(star, apix, box)
    with_ctf = _centred_fft2(_relion_project(vol_path, star, tmp_path / "ctf", apix, True))
    no_ctf = _centred_fft2(_relion_project(vol_path, star, tmp_path / "plain", apix, False))
    assert with_ctf.shape == (len(ROWS), box, box)
    reliable = np.abs(no_ctf) > 1e-3 * np.abs(no_ctf).max(axis=(1, 2), keepdims=True)
    relion_ctf = (with_ctf / np.where(reliable, no_ctf, 1.0)).real

    params = np.array(
        [[du, dv, ang, *OPTICS[g][:2], OPTICS[g][2], ph, b] for du, dv, ang, ph, b, g in ROWS]
    )
    kx, ky = _freqs(box, apix)
    ours = compute_ctf(params, kx.ravel(), ky.ravel()).reshape(len(ROWS), box, box)
    for i in range(len(ROWS)):
        m = reliable[i]
        assert m.mean() > 0.7  # RELION zeroes the corners beyond Nyquist (pi/4 of the box)
        r, o = relion_ctf[i][m], ours[i][m]
        assert np.corrcoef(r, o)[0, 1] > 0.999, (i, np.corrcoef(r, o)[0, 1])
        big = np.abs(r) > 0.05
        assert (np.sign(r[big]) == np.sign(o[big])).all(), i
        np.testing.assert_allclose(o, r, atol=1e-3)


@needs_relion_project
def test_ctf_matches_interop_relion_projections(interop, tmp_path):
    """The shared RELION 3.1.3 projections with CTF (classD_proj_ctf) vs our own CTF-free run.

    Same volume, angles and origin shifts; phase shift 90 deg, B-factors down to -320,
    rlnCtfScalefactor ~0.99 (a constant factor RELION applies: absorbed by correlation).
    """
    proj = interop / "tomodrgn10076_project"
    ctf_star = proj / "Project" / "classD_proj_ctf.star"
    ctf_stack = proj / "Project" / "classD_proj_ctf.mrcs"
    ref = proj / "ref_classD_13.1A.mrc"
    inp = proj / "proj_input_40.star"
    for f in (ctf_star, ctf_stack, ref, inp):
        if not f.exists():
            pytest.skip(f"{f} missing")
    import starfile

    table = starfile.read(inp)
    optics, parts = table["optics"], table["particles"]
    n = 12  # a subset keeps the test fast
    sub = tmp_path / "sub.star"
    starfile.write({"optics": optics, "particles": parts.iloc[:n]}, sub)
    apix = float(optics["rlnImagePixelSize"].iloc[0])
    box = int(optics["rlnImageSize"].iloc[0])
    plain = _centred_fft2(_relion_project(ref, sub, tmp_path / "plain", apix, False))
    withc = _centred_fft2(mrcfile.read(ctf_stack).astype(np.float64)[:n])
    reliable = np.abs(plain) > 1e-2 * np.abs(plain).max(axis=(1, 2), keepdims=True)
    relion_ctf = (withc / np.where(reliable, plain, 1.0)).real
    o = optics.iloc[0]
    p = parts.iloc[:n]
    params = np.stack(
        [
            p["rlnDefocusU"], p["rlnDefocusV"], p["rlnDefocusAngle"],
            np.full(n, o["rlnVoltage"]), np.full(n, o["rlnSphericalAberration"]),
            np.full(n, o["rlnAmplitudeContrast"]), p["rlnPhaseShift"], p["rlnCtfBfactor"],
        ],
        axis=1,
    ).astype(np.float64)  # fmt: skip
    kx, ky = _freqs(box, apix)
    ours = compute_ctf(params, kx.ravel(), ky.ravel()).reshape(n, box, box)
    for i in range(n):
        m = reliable[i] & (np.abs(ours[i]) > 1e-3)
        r, c = relion_ctf[i][m], ours[i][m]
        assert np.corrcoef(r, c)[0, 1] > 0.99, i
        big = np.abs(c) > 0.05 * np.abs(c).max()
        assert (np.sign(r[big]) == np.sign(c[big])).all(), i
