"""Contrast transfer function in RELION's convention, batched over particles.

CTF(k) = -sin(chi(k)) computed as in RELION 3.1's ``CTF::getCTF``:
    chi = -pi * lambda * defocus(phi) * |k|^2 + pi/2 * Cs * lambda^3 * |k|^4
          - phase_shift - atan(Q / sqrt(1 - Q^2))
    CTF = -sin(chi) * exp(-B |k|^2 / 4)
with defocus(phi) = (dU + dV)/2 + (dU - dV)/2 * cos(2 (phi - angle)),
phi = atan2(ky, kx), lambda the relativistic electron wavelength in Angstrom,
Cs in Angstrom, Q the amplitude contrast, |k| in 1/Angstrom. RELION's defocus
term enters with a minus sign (its astigmatism matrix is built from -dU, -dV),
so for underfocus (positive defocus) the CTF starts at sin(atan(Q/sqrt(1-Q^2)))
+ phase shift and its first lobe is positive.

Checked against relion_project --ctf (RELION 3.1.3) in tests/test_ctf.py: the
ratio of the Fourier transforms of projections with and without CTF equals this
function to 1e-5, with kx along image columns (x) and ky along rows (y) of the
image as mrcfile reads it (array [y, x]), zero frequency at index D//2.
"""

from __future__ import annotations

import numpy as np

from hetrefine.backend import get_xp

# column order of the per-particle CTF parameter array (see docs/architecture.md)
CTF_FIELDS = (
    "rlnDefocusU",
    "rlnDefocusV",
    "rlnDefocusAngle",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
    "rlnPhaseShift",
    "rlnCtfBfactor",
)


def electron_wavelength(voltage_kv):
    """Relativistic electron wavelength in Angstrom for an acceleration voltage in kV."""
    v = voltage_kv * 1e3
    return 12.2643247 / np.sqrt(v * (1.0 + v * 0.978466e-6))


def compute_ctf(params, kx, ky):
    """CTF values for a batch of particles at given Fourier coordinates.

    Parameters
    ----------
    params : (n, 8) array, columns as ``CTF_FIELDS`` (defocus U/V in Angstrom,
        angle in degrees, voltage kV, Cs mm, amplitude contrast, phase shift
        degrees, B-factor A^2).
    kx, ky : (m,) arrays, spatial frequencies in 1/Angstrom.

    Returns
    -------
    (n, m) float32 array of CTF values (RELION sign: -sin(chi)).
    """
    xp = get_xp(params, kx)
    p = params.astype(xp.float64)
    du, dv, ang = p[:, 0:1], p[:, 1:2], xp.deg2rad(p[:, 2:3])
    lam = electron_wavelength(p[:, 3:4])
    cs = p[:, 4:5] * 1e7
    q = p[:, 5:6]
    phase = xp.deg2rad(p[:, 6:7])
    bfac = p[:, 7:8]
    kx = kx.astype(xp.float64)[None, :]
    ky = ky.astype(xp.float64)[None, :]
    k2 = kx * kx + ky * ky
    phi = xp.arctan2(ky, kx)
    defocus = 0.5 * (du + dv) + 0.5 * (du - dv) * xp.cos(2.0 * (phi - ang))
    k1 = np.pi * lam
    k2c = 0.5 * np.pi * cs * lam**3
    k_amp = xp.arctan(q / xp.sqrt(1.0 - q * q))
    chi = -k1 * defocus * k2 + k2c * k2 * k2 - phase - k_amp
    ctf = -xp.sin(chi)
    ctf = ctf * xp.exp(-bfac * k2 / 4.0)
    return ctf.astype(xp.float32)
