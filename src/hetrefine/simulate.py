"""Simulated datasets with known truth: phantoms, particle stacks, truth tables.

Phantoms are sums of Gaussian blobs (asymmetric). The K classes share a body and
differ by one domain (``domain_fraction`` of the mass) that is moved to another
place (``variant="moved"``) or removed from all but the first class
(``variant="removed"``). Particles: uniform random orientations, random shifts,
per-particle CTF (defocus range, 300 kV, Cs 2.7 mm, amplitude contrast 0.1),
white Gaussian noise at a given SNR (the variance of the noise-free images over
the whole box, averaged over the dataset, over the noise variance). Optional junk:
pure-noise images, off-centre fragments and an unrelated particle.

Real atomic models instead of phantoms: :func:`atomic_volume` renders atoms
(coordinates in Angstrom, weights such as atomic numbers) at a pixel size, and
:func:`simulate_from_volumes` makes a dataset from any K truth volumes (and an
optional "other protein" volume for the junk). Options for realistic nuisances,
all off by default: an envelope B-factor on the images that the STAR file does
not carry (``envelope_b``), coloured noise (``noise_colour``, the whole-box SNR
kept), a per-particle intensity spread (``intensity_sd``) and a preferred view
(``preferred_view_fraction`` of the particles within ``preferred_view_sd_deg`` of
the top view).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd

from hetrefine.ctf import compute_ctf
from hetrefine.fourier import (
    centered_grid_radius,
    irfft2_centered,
    rfft2_centered,
    rfft_frequencies,
)
from hetrefine.io.atomic import atomic_path, write_text
from hetrefine.io.mrc import fixed_label, write_mrc
from hetrefine.projection import phase_shifts, prepare_reference, project
from hetrefine.rotations import euler_to_matrix, matrix_to_euler, random_rotations

log = logging.getLogger(__name__)


@dataclass
class SimulationSpec:
    """Everything that defines a simulated dataset (with ``seed``, it is reproducible)."""

    n_particles: int = 1000
    n_classes: int = 2
    box: int = 48
    pixel_size: float = 4.0
    snr: float = 0.1
    domain_fraction: float = 0.15
    variant: str = "moved"  # or "removed"
    class_fractions: list[float] | None = None
    junk_fraction: float = 0.0
    decoy: bool = False
    shift_max_px: float = 2.0
    defocus_range_A: tuple[float, float] = (8000.0, 25000.0)
    astigmatism_A: float = 400.0
    voltage_kv: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.1
    initial_lowpass_A: float | None = None  # default: 8 x pixel of the box... see initial_models
    initial_scale: float = 1.0  # grey scale of the initial models relative to the truth
    symmetry: str = "C1"  # point group imposed on the phantoms (RELION conventions)
    seed: int = 0
    chunk: int = 256
    extra: dict = field(default_factory=dict)
    envelope_b: float = 0.0  # A^2: exp(-B k^2 / 4) on the images, not written to the STAR
    noise_colour: float = 0.0  # 0 white; c > 0: noise amplitude (1 + (k / (box/8))^2)^(-c/2)
    intensity_sd: float = 0.0  # per-particle signal scale ~ N(1, sd), clipped to [0.3, 1.7]
    preferred_view_fraction: float = 0.0  # this fraction of good particles near the top view
    preferred_view_sd_deg: float = 15.0  # spread of the tilt around the top view


def _blob_volume(box: int, centers: np.ndarray, sigmas: np.ndarray, weights: np.ndarray):
    """Sum of Gaussian blobs (D, D, D); centres (b, 3) in pixels (x, y, z) from the centre."""
    g = np.arange(box) - box // 2
    z, y, x = np.meshgrid(g, g, g, indexing="ij")
    vol = np.zeros((box,) * 3, dtype=np.float64)
    for c, s, w in zip(centers, sigmas, weights):
        vol += w * np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * s * s))
    return vol


def _atoms_in_spheres(rng, centers, radii, n_atoms):
    """``n_atoms`` points (n, 3) uniform in the union of spheres (rejection sampling)."""
    vols = radii**3
    pick = rng.choice(len(centers), size=n_atoms, p=vols / vols.sum())
    d = rng.normal(size=(n_atoms, 3))
    d /= np.linalg.norm(d, axis=1)[:, None]
    r = radii[pick] * rng.uniform(0, 1, n_atoms) ** (1 / 3)
    return centers[pick] + d * r[:, None]


def _render_atoms(box: int, atoms: np.ndarray, sigma: float) -> np.ndarray:
    """Sum of unit Gaussians (sd ``sigma`` px) at atom positions (x, y, z) from the centre."""
    vol = np.zeros((box,) * 3, dtype=np.float64)
    c = box // 2
    h = int(np.ceil(4 * sigma))
    g = np.arange(-h, h + 1)
    for a in atoms:
        i = np.rint(a).astype(int)
        f = a - i
        ex = np.exp(-((g - f[0]) ** 2) / (2 * sigma**2))
        ey = np.exp(-((g - f[1]) ** 2) / (2 * sigma**2))
        ez = np.exp(-((g - f[2]) ** 2) / (2 * sigma**2))
        x0, y0, z0 = i[0] + c - h, i[1] + c - h, i[2] + c - h
        if min(x0, y0, z0) < 0 or max(x0, y0, z0) + 2 * h + 1 > box:
            continue
        vol[z0 : z0 + 2 * h + 1, y0 : y0 + 2 * h + 1, x0 : x0 + 2 * h + 1] += (
            ez[:, None, None] * ey[None, :, None] * ex[None, None, :]
        )
    return vol


def atomic_volume(
    coords_A: np.ndarray,
    weights: np.ndarray,
    box: int,
    pixel_size: float,
    sigma_A: float = 1.2,
    centre_A: np.ndarray | None = None,
) -> np.ndarray:
    """A map (D, D, D) float32 of an atomic model: a Gaussian of sd ``sigma_A`` per
    atom, weighted (e.g. by atomic number, a simple scattering factor), centred on the
    weighted centre of the atoms, or on ``centre_A`` (x, y, z in Angstrom: states of
    one particle drawn in one frame).

    coords_A (n, 3) in Angstrom (x, y, z); weights (n,). The Gaussian width stands
    for the atom's scattering profile plus its thermal motion; 1.2 A keeps the map
    sampled at pixel sizes of 1-2 A (features out to about 2/3 of Nyquist at 1.8 A/px).
    """
    coords = np.asarray(coords_A, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    centre = (coords * w[:, None]).sum(axis=0) / w.sum() if centre_A is None else centre_A
    px = (coords - centre) / pixel_size
    sigma = sigma_A / pixel_size
    vol = np.zeros((box,) * 3, dtype=np.float64)
    for z in np.unique(w):
        vol += z * _render_atoms(box, px[w == z], sigma)
    return vol.astype(np.float32)


def micelle_volume(
    protein: np.ndarray, pixel_size: float, radii_A, centre_A, density: float, soft_A: float = 3.0
) -> np.ndarray:
    """A detergent micelle around ``protein`` (a map (D, D, D)): an ellipsoid of semi-axes
    ``radii_A`` (x, y, z) centred at ``centre_A`` (Angstrom from the box centre) of uniform
    ``density`` times the protein's interior level (the mean of the protein map, smoothed
    by 2 A, over its voxels above half its maximum), with a Gaussian edge of sd ``soft_A``,
    left out where the protein is (1 - the protein's occupancy: its smoothed map over
    that level, clipped to [0, 1]). Float32, the micelle alone (add it to each state)."""
    from scipy.ndimage import gaussian_filter

    box = protein.shape[0]
    g = (np.arange(box) - box // 2) * pixel_size
    z, y, x = np.meshgrid(g, g, g, indexing="ij")
    (a, b, c), (cx, cy, cz) = radii_A, centre_A
    inside = ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 + ((z - cz) / c) ** 2 <= 1.0
    shell = gaussian_filter(inside.astype(np.float64), soft_A / pixel_size)
    smooth = gaussian_filter(protein.astype(np.float64), 2.0 / pixel_size)
    level = smooth[smooth > 0.5 * smooth.max()].mean()
    occupancy = np.clip(smooth / level, 0.0, 1.0)
    return (density * level * shell * (1.0 - occupancy)).astype(np.float32)


def phantoms(spec: SimulationSpec) -> list[np.ndarray]:
    """K ground-truth volumes (D, D, D) float32 that differ by one domain.

    Pseudo-atomic: Gaussian "atoms" (sd 0.8 px) filling an asymmetric body
    made of overlapping spheres, so the maps have detail out to about 2/3 of
    Nyquist. The domain is a sphere of atoms holding ``domain_fraction`` of them,
    attached at a different place of the body in each class (``moved``), or
    present only in class 1 (``removed``).
    """
    rng = np.random.default_rng([spec.seed, 11])
    box = spec.box
    n_lobes = 7
    lobe_c = rng.normal(size=(n_lobes, 3))
    lobe_c *= (0.15 * box * rng.uniform(0.3, 1.0, n_lobes) / np.linalg.norm(lobe_c, axis=1))[
        :, None
    ]
    lobe_r = rng.uniform(0.07, 0.11, n_lobes) * box
    sigma = 0.8
    n_body = int(0.6 * (box / 48) ** 3 * 500)
    body = _atoms_in_spheres(rng, lobe_c, lobe_r, n_body)
    f = spec.domain_fraction
    n_dom = max(1, int(round(f / (1 - f) * n_body)))
    dom_r = float((lobe_r**3).mean() * n_dom / n_body * n_lobes) ** (1 / 3)
    dom_atoms = _atoms_in_spheres(rng, np.zeros((1, 3)), np.array([dom_r]), n_dom)
    vols = []
    for k in range(spec.n_classes):
        if spec.variant == "removed" and k > 0:
            atoms = body
        else:
            angle = 2 * np.pi * (k if spec.variant == "moved" else 0) / max(spec.n_classes, 1)
            anchor = (0.15 * box + dom_r) * np.array(
                [np.cos(angle), np.sin(angle), 0.4 * np.sin(2 * angle + 0.5)]
            )
            atoms = np.concatenate([body, dom_atoms + anchor])
        vols.append(_render_atoms(box, atoms, sigma).astype(np.float32))
    if spec.symmetry.upper() != "C1":
        from hetrefine.symmetrize import symmetrize_volume
        from hetrefine.symmetry import symmetry_matrices

        mats = symmetry_matrices(spec.symmetry)
        vols = [symmetrize_volume(v, mats, order=3).astype(np.float32) for v in vols]
    return vols


def unrelated_phantom(spec: SimulationSpec) -> np.ndarray:
    """An elongated, unrelated particle used for the 'other protein' junk."""
    rng = np.random.default_rng([spec.seed, 29])
    t = np.linspace(-0.3, 0.3, 7)[:, None] * spec.box
    centers = np.concatenate([t, 0.1 * t, rng.normal(0, 1, (7, 1))], axis=1)
    return _blob_volume(spec.box, centers, np.full(7, 0.05 * spec.box), np.ones(7)).astype(
        np.float32
    )


def lowpass(vol: np.ndarray, resolution_A: float, pixel_size: float) -> np.ndarray:
    """Gaussian-edged low-pass of a volume to ``resolution_A``."""
    box = vol.shape[0]
    f = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(vol)))
    r = centered_grid_radius(vol.shape) / (box * pixel_size)  # 1/A
    cut = 1.0 / resolution_A
    filt = np.exp(-0.5 * (r / cut) ** 2 * np.log(2) * 2)  # 1/sqrt(2) ... half power at cut
    return np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(f * filt))).real.astype(np.float32)


def decoy_model(spec: SimulationSpec) -> np.ndarray:
    """A featureless sphere-ish blob of about the particle's size (a decoy class)."""
    r = centered_grid_radius((spec.box,) * 3)
    return np.exp(-0.5 * (r / (0.18 * spec.box)) ** 2).astype(np.float32)


def _ctf_params(n: int, spec: SimulationSpec, rng: np.random.Generator) -> np.ndarray:
    du = rng.uniform(*spec.defocus_range_A, n)
    dv = du - rng.uniform(0, spec.astigmatism_A, n)
    ang = rng.uniform(-180, 180, n)
    p = np.zeros((n, 8), dtype=np.float32)
    p[:, 0], p[:, 1], p[:, 2] = du, dv, ang
    p[:, 3], p[:, 4], p[:, 5] = spec.voltage_kv, spec.cs_mm, spec.amplitude_contrast
    return p


def _render(grid, rots, shifts_px, ctf_params, spec: SimulationSpec) -> np.ndarray:
    """Noise-free CTF-modulated, shifted projections (n, D, D)."""
    box = spec.box
    kyy, kxx = rfft_frequencies(box)
    kx = kxx.ravel().astype(np.float32)
    ky = kyy.ravel().astype(np.float32)
    slices = project(grid, rots.astype(np.float32), kx, ky, pad=2)
    freq = 1.0 / (box * spec.pixel_size)
    ctf = compute_ctf(ctf_params, kx * freq, ky * freq)
    if spec.envelope_b:
        ctf = ctf * np.exp(-spec.envelope_b / 4.0 * (kx * kx + ky * ky) * freq * freq).astype(
            np.float32
        )
    ph = phase_shifts(kx, ky, shifts_px.astype(np.float32), box)
    spectra = (slices * ctf * ph).reshape(len(rots), box, box // 2 + 1)
    return irfft2_centered(spectra, box)


def simulate_dataset(spec: SimulationSpec, out_dir: str | Path) -> dict:
    """Write a simulated dataset to ``out_dir`` and return a summary dict.

    Files: particles.mrcs, particles.star (RELION 3.1, no pose or class),
    truth.csv (class (0 = junk), junk_kind, rot/tilt/psi, shift in Angstrom),
    truth_class_{k:02d}.mrc, initial_model_{k:02d}.mrc (low-passed truth times
    ``initial_scale``; plus a decoy blob as model K+1 when ``decoy``), spec.json.
    """
    return simulate_from_volumes(spec, out_dir, phantoms(spec), unrelated_phantom(spec))


def _noise_filter(spec: SimulationSpec) -> np.ndarray | None:
    """Amplitude filter (D, D//2+1) of coloured noise, normalised so that the noise
    variance over the whole box is unchanged (the whole-box SNR holds); None: white."""
    if not spec.noise_colour:
        return None
    kyy, kxx = rfft_frequencies(spec.box)
    r = np.hypot(kxx, kyy)
    f = (1.0 + (r / (spec.box / 8.0)) ** 2) ** (-spec.noise_colour / 2.0)
    # mean power over the full plane: the rfft's kx > 0 columns (but Nyquist) count twice
    mult = np.full(f.shape, 2.0)
    mult[:, 0] = 1.0
    if spec.box % 2 == 0:
        mult[:, -1] = 1.0
    return (f / np.sqrt((mult * f * f).sum() / mult.sum())).astype(np.float32)


def _preferred_views(n: int, spec: SimulationSpec, rng: np.random.Generator) -> np.ndarray:
    """Rotations (n, 3, 3) whose viewing direction lies within about
    ``preferred_view_sd_deg`` of the top view (tilt |N(0, sd)|, rot and psi uniform)."""
    ang = np.stack(
        [
            rng.uniform(-180, 180, n),
            np.abs(rng.normal(0.0, spec.preferred_view_sd_deg, n)),
            rng.uniform(-180, 180, n),
        ],
        axis=1,
    )
    return euler_to_matrix(ang)


def simulate_from_volumes(
    spec: SimulationSpec,
    out_dir: str | Path,
    vols: list[np.ndarray],
    other: np.ndarray | None = None,
) -> dict:
    """:func:`simulate_dataset` from given truth volumes (K of them, (D, D, D) at
    ``spec.box`` and ``spec.pixel_size``; ``spec.n_classes`` must equal K), e.g. maps of
    atomic models from :func:`atomic_volume`. ``other``: the "other protein" of the
    junk (default: an elongated blob particle). Besides the files of
    :func:`simulate_dataset`, truth.csv has the per-particle intensity ``scale``.
    """
    if len(vols) != spec.n_classes:
        raise ValueError(f"{len(vols)} volumes for n_classes={spec.n_classes}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([spec.seed, 3])
    box, px, n = spec.box, spec.pixel_size, spec.n_particles
    grids = [prepare_reference(v, 2) for v in vols]
    other_grid = prepare_reference(unrelated_phantom(spec) if other is None else other, 2)
    fragment_grid = prepare_reference(
        _blob_volume(box, np.zeros((1, 3)), np.array([0.06 * box]), np.ones(1)).astype(np.float32),
        2,
    )

    n_junk = int(round(spec.junk_fraction * n))
    fr = np.asarray(spec.class_fractions or [1.0] * spec.n_classes, dtype=np.float64)
    fr = fr / fr.sum()
    n_good = n - n_junk
    counts = np.floor(fr * n_good).astype(int)
    counts[: n_good - counts.sum()] += 1
    labels = np.concatenate(
        [np.full(c, k + 1) for k, c in enumerate(counts)] + [np.zeros(n_junk, int)]
    )
    junk_kinds = np.array(["", "noise", "fragment", "other"])
    kind = np.zeros(n, dtype=int)
    kind[labels == 0] = rng.integers(1, 4, n_junk)
    perm = rng.permutation(n)
    labels, kind = labels[perm], kind[perm]
    rots = random_rotations(n, rng)
    shifts = rng.uniform(-spec.shift_max_px, spec.shift_max_px, (n, 2))
    shifts[kind == 2] = rng.uniform(0.2 * box, 0.3 * box, (int((kind == 2).sum()), 2)) * rng.choice(
        [-1, 1], (int((kind == 2).sum()), 2)
    )
    ctf = _ctf_params(n, spec, rng)
    # the nuisances draw from their own streams: a set without them is unchanged
    scale = np.ones(n)
    if spec.intensity_sd:
        scale = np.clip(
            np.random.default_rng([spec.seed, 7]).normal(1.0, spec.intensity_sd, n), 0.3, 1.7
        )
    if spec.preferred_view_fraction:
        pv_rng = np.random.default_rng([spec.seed, 8])
        good = np.flatnonzero(labels > 0)
        pick = good[pv_rng.random(len(good)) < spec.preferred_view_fraction]
        rots[pick] = _preferred_views(len(pick), spec, pv_rng)
    nfilt = _noise_filter(spec)

    # noise level from the mean signal variance of a sample of good particles
    sample = np.flatnonzero(labels > 0)[:200]
    sig_var = np.mean(
        [
            _render(
                grids[labels[i] - 1], rots[i : i + 1], shifts[i : i + 1], ctf[i : i + 1], spec
            ).var()
            * (scale[i] ** 2 if spec.intensity_sd else 1)
            for i in sample
        ]
    )
    noise_sd = float(np.sqrt(sig_var / spec.snr))

    stack_path = out / "particles.mrcs"
    with atomic_path(stack_path, suffix=".mrcs") as tmp:
        with mrcfile.new_mmap(tmp, shape=(n, box, box), mrc_mode=2, overwrite=True) as mrc:
            mrc.voxel_size = px
            mrc.set_image_stack()
            for c0 in range(0, n, spec.chunk):
                c1 = min(c0 + spec.chunk, n)
                imgs = np.zeros((c1 - c0, box, box), dtype=np.float32)
                for src, g in [(k + 1, gr) for k, gr in enumerate(grids)] + [
                    (-2, fragment_grid),
                    (-3, other_grid),
                ]:
                    if src > 0:
                        sel = np.flatnonzero(labels[c0:c1] == src)
                    else:
                        sel = np.flatnonzero(kind[c0:c1] == -src)
                    if len(sel):
                        i = c0 + sel
                        imgs[sel] = _render(g, rots[i], shifts[i], ctf[i], spec)
                if spec.intensity_sd:
                    imgs *= scale[c0:c1, None, None].astype(np.float32)
                noise_rng = np.random.default_rng([spec.seed, 5, c0])
                noise = noise_rng.standard_normal(imgs.shape).astype(np.float32)
                if nfilt is not None:
                    noise = irfft2_centered(rfft2_centered(noise) * nfilt, box)
                imgs += noise_sd * noise
                mrc.data[c0:c1] = imgs
            mrc.update_header_stats()
            fixed_label(mrc)

    euler = matrix_to_euler(rots)
    names = [f"{i + 1:06d}@particles.mrcs" for i in range(n)]
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnVoltage": [spec.voltage_kv],
            "rlnSphericalAberration": [spec.cs_mm],
            "rlnAmplitudeContrast": [spec.amplitude_contrast],
            "rlnImagePixelSize": [px],
            "rlnImageSize": [box],
            "rlnImageDimensionality": [2],
        }
    )
    particles = pd.DataFrame(
        {
            "rlnImageName": names,
            "rlnDefocusU": ctf[:, 0].astype(np.float64).round(2),
            "rlnDefocusV": ctf[:, 1].astype(np.float64).round(2),
            "rlnDefocusAngle": ctf[:, 2].astype(np.float64).round(3),
            "rlnPhaseShift": 0.0,
            "rlnCtfBfactor": 0.0,
            "rlnOpticsGroup": 1,
        }
    )
    _write_star(out / "particles.star", optics, particles)
    truth = pd.DataFrame(
        {
            "index": np.arange(n),
            "class": labels,
            "junk_kind": junk_kinds[kind],
            "rot": euler[:, 0],
            "tilt": euler[:, 1],
            "psi": euler[:, 2],
            "shift_x_A": shifts[:, 0] * px,
            "shift_y_A": shifts[:, 1] * px,
            **({"scale": scale} if spec.intensity_sd else {}),
        }
    )
    with atomic_path(out / "truth.csv") as tmp:
        truth.to_csv(tmp, index=False)

    lp = spec.initial_lowpass_A or 8.0 * px
    for k, v in enumerate(vols):
        write_mrc(out / f"truth_class_{k + 1:02d}.mrc", v, px)
        write_mrc(
            out / f"initial_model_{k + 1:02d}.mrc", spec.initial_scale * lowpass(v, lp, px), px
        )
    if spec.decoy:
        dec = decoy_model(spec) * float(vols[0].sum() / decoy_model(spec).sum())
        write_mrc(
            out / f"initial_model_{len(vols) + 1:02d}.mrc",
            spec.initial_scale * lowpass(dec, lp, px),
            px,
        )
    summary = {"noise_sd": noise_sd, "signal_var": float(sig_var), **asdict(spec)}
    write_text(out / "spec.json", json.dumps(summary, indent=1, default=list))
    log.info(
        "simulated %d particles (%d junk), box %d, %.2f A/px, SNR %.3g",
        n,
        n_junk,
        box,
        px,
        spec.snr,
    )
    return summary


def _write_star(path: Path, optics: pd.DataFrame, particles: pd.DataFrame) -> None:
    """RELION 3.1 STAR (optics + particles), atomically."""
    try:
        from hetrefine.io.star import write_particles_star
    except ImportError:  # the I/O module may be absent in a partial checkout
        write_particles_star = None
    if write_particles_star is not None:
        table = particles.merge(optics, on="rlnOpticsGroup", how="left")
        write_particles_star(path, table)
        return
    import starfile

    with atomic_path(path, suffix=".star") as tmp:
        starfile.write({"optics": optics, "particles": particles}, tmp, overwrite=True)
