"""Datasets from atomic models and the realistic nuisances of ``hetrefine.simulate``:
maps of atoms where the atoms are, coloured noise at the same whole-box SNR,
per-particle intensity scales and preferred views written to the truth table, a
detergent micelle of the given shape and density that leaves the protein out."""

from __future__ import annotations

import mrcfile
import numpy as np
import pandas as pd

from hetrefine.fourier import irfft2_centered, rfft2_centered
from hetrefine.simulate import (
    SimulationSpec,
    _noise_filter,
    atomic_volume,
    micelle_volume,
    simulate_from_volumes,
)


def test_atomic_volume_puts_weighted_atoms_where_they_are():
    # a carbon at the origin and an oxygen 9 A along x: centred on their weighted centre
    coords = np.array([[0.0, 0.0, 0.0], [9.0, 0.0, 0.0]])
    vol = atomic_volume(coords, np.array([6.0, 8.0]), box=32, pixel_size=1.5)
    c = 16
    centre = 9.0 * 8 / 14 / 1.5  # px from the carbon
    x_c, x_o = c - centre, c + (9.0 / 1.5 - centre)
    prof = vol[c, c, :]
    assert np.argmax(prof[:c]) == np.rint(x_c)
    assert c + np.argmax(prof[c:]) == np.rint(x_o)
    # mass in proportion to the weights (each Gaussian sums to its weight x (2 pi)^1.5 sd^3)
    left, right = vol[..., :c].sum(), vol[..., c:].sum()
    assert abs(left / right - 6 / 8) < 0.05
    sd = 1.2 / 1.5
    assert abs(vol.sum() - 14 * (2 * np.pi) ** 1.5 * sd**3) < 1e-3 * vol.sum()


def test_atomic_volume_keeps_a_given_centre():
    coords = np.array([[0.0, 0.0, 0.0], [9.0, 0.0, 0.0]])
    vol = atomic_volume(coords, np.array([6.0, 8.0]), 32, 1.5, centre_A=np.zeros(3))
    assert np.unravel_index(np.argmax(vol), vol.shape) == (16, 16, 22)  # oxygen 6 px along x


def test_micelle_has_its_shape_and_density_and_leaves_the_protein_out():
    # a dense ball of carbons (radius 8 A) inside an oblate micelle of semi-axes 20, 20, 8 A
    px, box = 1.0, 64
    rng = np.random.default_rng(0)
    d = rng.normal(size=(3000, 3))
    atoms = d / np.linalg.norm(d, axis=1)[:, None] * 8.0 * rng.uniform(0, 1, (3000, 1)) ** (1 / 3)
    prot = atomic_volume(atoms, np.full(3000, 6.0), box, px, centre_A=np.zeros(3))
    mic = micelle_volume(prot, px, (20.0, 20.0, 8.0), (2.0, 0.0, -1.0), density=0.3, soft_A=1.5)
    c = box // 2
    level = mic[c - 1, c, c + 16] / 0.3  # in the micelle, 16 A from the protein's centre
    smooth_interior = prot[c - 3 : c + 4, c - 3 : c + 4, c - 3 : c + 4].mean()
    # the protein's level: its mean above half its maximum, which takes in part of its edge
    assert 0.6 < level / smooth_interior < 1.0
    assert mic[c, c, c] < 0.02 * mic.max()  # no micelle inside the protein
    assert (
        mic[c - 1, c, c - 16] < 0.9 * mic[c - 1, c, c + 16]
    )  # centred at x = 2 A: -16 nears the edge
    assert mic[c + 12, c, c + 2] < 0.01 * mic.max()  # 13 A above the plane: outside
    assert mic[c - 1, c, c + 2 + 24] < 0.01 * mic.max()  # 24 A along x: outside
    # volume: the ellipsoid's less the ball's, at the micelle's density
    vol_a3 = mic.sum() / (0.3 * level) * px**3
    expected = 4 / 3 * np.pi * (20 * 20 * 8 - 8**3)
    assert abs(vol_a3 / expected - 1) < 0.15


def test_coloured_noise_keeps_whole_box_variance_and_falls_with_frequency():
    spec = SimulationSpec(box=48, noise_colour=1.5)
    f = _noise_filter(spec)
    noise = np.random.default_rng(0).standard_normal((400, 48, 48)).astype(np.float32)
    coloured = irfft2_centered(rfft2_centered(noise) * f, 48)
    assert abs(coloured.var() - 1.0) < 0.02
    p = np.abs(rfft2_centered(coloured)) ** 2
    assert p[:, 1, 1].mean() > 5 * p[:, 0, 20].mean()  # low frequencies carry more
    assert _noise_filter(SimulationSpec(box=48)) is None


def test_simulate_from_volumes_writes_scales_and_preferred_views(tmp_path):
    rng = np.random.default_rng(1)
    vols = [atomic_volume(rng.normal(0, 5, (200, 3)), np.full(200, 6.0), 24, 2.0) for _ in range(2)]
    spec = SimulationSpec(
        n_particles=300,
        n_classes=2,
        box=24,
        pixel_size=2.0,
        snr=0.5,
        intensity_sd=0.15,
        preferred_view_fraction=1.0,
        preferred_view_sd_deg=10.0,
        envelope_b=50.0,
        noise_colour=1.0,
    )
    summary = simulate_from_volumes(spec, tmp_path, vols)
    t = pd.read_csv(tmp_path / "truth.csv")
    assert abs(t["scale"].std() - 0.15) < 0.03 and abs(t["scale"].mean() - 1) < 0.03
    assert np.percentile(t["tilt"], 95) < 25  # every view near the top view
    imgs = mrcfile.open(tmp_path / "particles.mrcs").data
    # whole-box SNR: image variance = signal + noise variance, noise = signal / SNR
    assert abs(imgs.var() / (summary["signal_var"] * (1 + 1 / spec.snr)) - 1) < 0.1
    for k in (1, 2):
        with mrcfile.open(tmp_path / f"truth_class_{k:02d}.mrc") as m:
            assert np.allclose(m.data, vols[k - 1])
