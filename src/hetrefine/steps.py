"""One function per workflow step: files in, files out, config dict.

The workflow's scripts call these; they never know about Snakemake. Every
output is written atomically. File formats: docs/architecture.md.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np

from hetrefine import __version__
from hetrefine.alignment import SearchSettings, search_around_given_poses, search_poses
from hetrefine.backend import select_device, to_host
from hetrefine.classification import (
    anneal_similarity,
    class_posteriors,
    online_em_selection,
    posterior_entropy,
)
from hetrefine.ctf import CTF_FIELDS, compute_ctf
from hetrefine.errors import InputError
from hetrefine.fourier import (
    fourier_resize,
    half_plane_indices,
    normalize_images,
    rfft2_centered,
)
from hetrefine.fsc import masked_fsc_corrected, resolution_angstrom, resolution_shell
from hetrefine.io.atomic import atomic_path, write_text
from hetrefine.io.mrc import read_volume, write_mrc
from hetrefine.mask import default_mask_diameters, soft_sphere
from hetrefine.projection import (
    backproject_packed,
    backproject_poses_packed,
    grid_half_size,
    half_ball_mask,
    hermitian_unpack,
    phase_shifts,
    prepare_reference,
    project,
)
from hetrefine.reconstruction import snr_from_fsc, wiener_volume
from hetrefine.rotations import euler_to_matrix, matrix_to_euler
from hetrefine.sampling import so3_grid
from hetrefine.symmetry import asymmetric_unit_mask, symmetrize_fourier, symmetry_matrices

log = logging.getLogger("hetrefine")

PAD = 2


# ---------------------------------------------------------------------------- small helpers


def _save_npz(path, **arrays) -> None:
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


def _load_npz(path) -> dict:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def _read_json(path) -> dict:
    with open(path) as fh:
        return json.load(fh)


def particle_diameter_A(config: dict, box: int, pixel_size: float) -> float:
    """Particle diameter used for normalisation: config value or 0.75 of the box."""
    d = config.get("particle_diameter_A")
    return float(d) if d else 0.75 * box * pixel_size


def mask_diameters(config: dict, box: int, pixel_size: float) -> tuple[float, float]:
    """Inner and outer mask diameters (Angstrom) from config with the documented defaults."""
    m = config.get("mask") or {}
    inner = m.get("inner_diameter_A") or particle_diameter_A(config, box, pixel_size)
    return default_mask_diameters(box, pixel_size, inner, m.get("outer_diameter_A"))


# ---------------------------------------------------------------------------- demo


def simulate_demo(out_dir: str, config: dict) -> None:
    """Simulate the demo data set described by ``config['demo']`` into ``out_dir``."""
    from hetrefine.simulate import SimulationSpec, simulate_dataset

    d = config.get("demo") or {}
    spec = SimulationSpec(
        n_particles=int(d.get("n_particles", 1000)),
        n_classes=int(d.get("n_classes", 2)),
        box=int(d.get("box", 48)),
        pixel_size=float(d.get("pixel_size", 4.0)),
        snr=float(d.get("snr", 0.1)),
        domain_fraction=float(d.get("domain_fraction", 0.15)),
        junk_fraction=float(d.get("junk_fraction", 0.0)),
        decoy=bool(d.get("decoy", False)),
        seed=int(d.get("seed", 0)),
        initial_scale=float(d.get("initial_scale", 1.0)),
    )
    simulate_dataset(spec, out_dir)


# ---------------------------------------------------------------------------- preprocess


def preprocess(particles: str, out_dir: str, n_shards: int, config: dict) -> None:
    """Validate the particles, Fourier-crop to the refinement box, normalise, split halves,
    write fixed-size shards. Memory: one shard of images at a time."""
    import pandas as pd

    from hetrefine.io.particles import iter_image_chunks, read_particles

    t0 = time.time()
    table = read_particles(
        particles, pixel_size=config.get("pixel_size"), project_dir=config.get("project_dir")
    )
    n = len(table)
    shard_size = int(config["shard_size"])
    expected = max(1, math.ceil(n / shard_size))
    if expected != n_shards:
        raise InputError(
            particles,
            f"holds {n} particles, i.e. {expected} shards of {shard_size}, but the workflow "
            f"planned {n_shards}; rerun snakemake so it recounts",
        )
    in_box = int(table["rlnImageSize"].iloc[0])
    in_px = float(table["rlnImagePixelSize"].iloc[0])
    box = int(config.get("refine_box") or in_box)
    if box > in_box:
        raise InputError("config", f"refine_box {box} is larger than the particle box {in_box}", "refine_box")
    px = in_px * in_box / box
    radius_px = particle_diameter_A(config, box, px) / 2 / px

    if "rlnRandomSubset" in table.columns:
        half = (table["rlnRandomSubset"].to_numpy().astype(int) - 1).clip(0, 1)
        log.info("half-sets from _rlnRandomSubset")
    else:
        rank = np.random.default_rng([int(config["seed"]), 1]).permutation(n)
        half = (rank % 2).astype(int)
    ctf = np.stack([table[c].to_numpy(dtype=np.float64) for c in CTF_FIELDS], axis=1)
    pose_cols = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
    has_poses = all(c in table.columns for c in pose_cols)
    if has_poses:  # kept for `input_poses: fixed|local`; ignored otherwise
        poses = table[pose_cols].to_numpy(dtype=np.float64)
        origins = np.stack(
            [table.get(c, pd.Series(0.0, index=table.index)).to_numpy(dtype=np.float64)
             for c in ("rlnOriginXAngst", "rlnOriginYAngst")],
            axis=1,
        )

    out = Path(out_dir)
    # a seeded sample over the whole stack for init (grey scale, noise): does not
    # depend on the sharding
    sample = np.sort(np.random.default_rng([int(config["seed"]), 2]).permutation(n)[: min(300, n)])
    sample_imgs = np.zeros((len(sample), box, box), np.float32)
    for s in range(n_shards):
        rows = np.arange(s * shard_size, min((s + 1) * shard_size, n))
        sub = table.iloc[rows]
        imgs = np.zeros((len(rows), box, box), dtype=np.float32)
        for pos, chunk in iter_image_chunks(sub, 256):
            chunk = fourier_resize(chunk, box) if box != in_box else chunk
            imgs[pos] = normalize_images(chunk, radius_px)
        in_shard = (sample >= rows[0]) & (sample <= rows[-1])
        sample_imgs[in_shard] = imgs[sample[in_shard] - rows[0]]
        _save_npz(
            out / f"shard_{s:04d}.npz",
            images=imgs,
            index=rows.astype(np.int64),
            half=half[rows].astype(np.int8),
            ctf=ctf[rows].astype(np.float32),
            **({"euler": poses[rows], "origin_A": origins[rows]} if has_poses else {}),
        )
        log.info("shard %d/%d: %d particles", s + 1, n_shards, len(rows))
    _save_npz(out / "sample.npz", images=sample_imgs, index=sample.astype(np.int64), ctf=ctf[sample].astype(np.float32))
    with atomic_path(out / "metadata.pkl", suffix=".pkl") as tmp:
        table.to_pickle(tmp)
    info = {
        "n_particles": n,
        "n_shards": n_shards,
        "box": box,
        "pixel_size": px,
        "input_box": in_box,
        "input_pixel_size": in_px,
        "source": str(particles),
        "hetrefine": __version__,
    }
    _write_json(out / "info.json", info)
    log.info(
        "preprocess: %d particles, box %d -> %d, %.3f -> %.3f A/px, %d shards (%.1f s)",
        n, in_box, box, in_px, px, n_shards, time.time() - t0,
    )


# ---------------------------------------------------------------------------- mask


def make_mask(info: str, out_mask: str, config: dict) -> None:
    """Soft spherical mask at the refinement box (ones when the mask is disabled)."""
    inf = _read_json(info)
    box, px = int(inf["box"]), float(inf["pixel_size"])
    inner, outer = mask_diameters(config, box, px)
    if not (config.get("mask") or {}).get("enabled", True):
        mask = np.ones((box,) * 3, np.float32)
        log.info("mask disabled: using ones")
    else:
        if inner > box * px * 1.0001 or outer > box * px * 1.0001:
            m = config.get("mask") or {}
            key = (
                "mask.inner_diameter_A" if m.get("inner_diameter_A") else
                "particle_diameter_A" if config.get("particle_diameter_A") else "mask.outer_diameter_A"
            )
            raise InputError(
                "config",
                f"mask diameter {max(inner, outer):.1f} A is larger than the box "
                f"({box} px x {px:.3f} A = {box * px:.1f} A); use at most {box * px:.1f} A",
                key,
            )
        mask = soft_sphere(box, px, inner, outer)
        log.info("mask: inner %.1f A, outer %.1f A, box %d at %.3f A/px", inner, outer, box, px)
    write_mrc(out_mask, mask, px)


# ---------------------------------------------------------------------------- init


def resample_volume(vol: np.ndarray, vol_px: float, box: int, px: float) -> np.ndarray:
    """Resample a cubic map to ``box`` voxels of ``px`` Angstrom (Fourier rescale, then
    centred crop or zero pad)."""
    n = vol.shape[0]
    m = max(2, int(round(n * vol_px / px)))
    m += m % 2 if n % 2 == 0 else 0
    v = fourier_resize(vol, m, ndim=3) if m != n else vol.astype(np.float32)
    if m == box:
        return v
    out = np.zeros((box,) * 3, np.float32)
    c_in, c_out = m // 2, box // 2
    h = min(m, box)
    a, b = c_in - h // 2, c_out - h // 2
    out[b : b + h, b : b + h, b : b + h] = v[a : a + h, a : a + h, a : a + h]
    return out


def lowpass_volume(vol: np.ndarray, resolution_A: float, px: float) -> np.ndarray:
    """Soft (cosine-edged, 2 shells wide) low-pass of a map to ``resolution_A``."""
    from hetrefine.fourier import centered_grid_radius

    box = vol.shape[0]
    r = centered_grid_radius(vol.shape)
    cut = box * px / resolution_A
    filt = np.clip(0.5 + 0.5 * np.cos(np.pi * np.clip((r - cut + 1) / 2, 0, 1)), 0, 1)
    f = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(vol)))
    return np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(f * filt))).real.astype(np.float32)


def _shell_power(spectra: np.ndarray, box: int) -> np.ndarray:
    """Mean |F|^2 per integer shell 0..D//2 of rfft spectra (n, D, D//2+1)."""
    from hetrefine.fourier import radial_shells, shell_average

    shells = radial_shells(box)
    p = (np.abs(spectra) ** 2).mean(axis=0)
    return shell_average(p, shells, box // 2 + 1)


def estimate_grey_scale(
    vol, images, spectra, ctf, mask, px: float, radius_px: float, seed: int = 0
):
    """Scale ``a`` that puts a map on the particles' grey scale, and the sign evidence.

    Magnitude: the particles' signal variance inside the mask's disc (total minus the
    unit noise variance of normalised images) over that of CTF-modulated projections
    of the map at random poses. Sign: the median least-squares scale of each particle
    at its best pose (by normalised correlation) on a coarse grid at low resolution.
    """
    from hetrefine.fourier import centered_grid_radius, irfft2_centered, rfft_frequencies
    from hetrefine.rotations import random_rotations

    box = vol.shape[0]
    rng = np.random.default_rng([seed, 77])
    grid = prepare_reference(vol * mask, PAD)
    n = len(images)
    kyy, kxx = rfft_frequencies(box)
    kx, ky = kxx.ravel().astype(np.float32), kyy.ravel().astype(np.float32)
    rots = random_rotations(n, rng).astype(np.float32)
    freq = 1.0 / (box * px)
    c = compute_ctf(ctf, kx * freq, ky * freq)
    proj = irfft2_centered((project(grid, rots, kx, ky, PAD) * c).reshape(n, box, box // 2 + 1), box)
    disc = centered_grid_radius((box, box)) <= radius_px
    var_img = float(images[:, disc].var(axis=1).mean())
    var_proj = float(proj[:, disc].var(axis=1).mean())
    signal = max(var_img - 1.0, 0.05 * var_img)
    mag = math.sqrt(signal / max(var_proj, 1e-30))
    # sign: correlation at the best of a coarse grid, low resolution
    flat, kx2, ky2 = half_plane_indices(box, min(box / 2 - 1, 0.25 * box))
    y = spectra.reshape(n, -1)[:, flat]  # rfft2_centered(images), computed once by the caller
    c2 = compute_ctf(ctf, kx2 * freq, ky2 * freq)
    grid_rots = so3_grid(20).astype(np.float32)
    a = project(grid, grid_rots, kx2, ky2, PAD)  # (R, m)
    xr = np.concatenate([(y * c2).real, (y * c2).imag], 1)
    ar = np.concatenate([a.real, a.imag], 1)
    cross = xr @ ar.T  # (n, R)
    norm = (c2 * c2) @ (np.abs(a) ** 2).T
    cc = cross / np.sqrt(np.maximum(norm, 1e-30))
    best = np.abs(cc).argmax(axis=1)
    per = cross[np.arange(n), best] / np.maximum(norm[np.arange(n), best], 1e-30)
    sign = 1.0 if np.median(per) >= 0 else -1.0
    return sign * mag


def init_references(
    models: list[str], info: str, shard: str, mask: str, out_refs: str, out_model: str, config: dict
) -> None:
    """Resample the initial models to the refinement box, put them on the particles' grey
    scale, low-pass them, and write iteration 0's references and statistics.

    ``shard``: preprocess's ``sample.npz`` (a seeded sample of the whole stack; any
    shard file also works)."""
    inf = _read_json(info)
    box, px = int(inf["box"]), float(inf["pixel_size"])
    mask_vol, _ = read_volume(mask)
    sh = _load_npz(shard)
    imgs, ctf = sh["images"][:300], sh["ctf"][:300]
    lowpass_A = float(config["initial_lowpass_A"])
    radius_px = particle_diameter_A(config, box, px) / 2 / px
    spectra = rfft2_centered(imgs)
    maps = np.zeros((len(models), 2, box, box, box), np.float32)
    scales = []
    for k, path in enumerate(models):
        vol, vpx = read_volume(path)
        if vpx <= 0:
            vpx = float(inf["input_pixel_size"])
            log.warning("%s: no pixel size in the header; assuming the particles' %.3f A", path, vpx)
        if vol.shape[0] != box or abs(vpx - px) > 1e-3 * px:
            log.info(
                "%s: resampled from box %d at %.3f A/px to box %d at %.3f A/px",
                path, vol.shape[0], vpx, box, px,
            )
        vol = resample_volume(vol, vpx, box, px)
        vol = lowpass_volume(vol, lowpass_A, px)
        if not np.any(vol):
            raise InputError(path, "initial model is empty (all zero after resampling)")
        a = estimate_grey_scale(vol, imgs, spectra, ctf, mask_vol, px, radius_px, int(config["seed"]))
        if a < 0:
            log.warning(
                "%s: contrast looks inverted relative to the particles (scale %.3g); flipped", path, a
            )
        log.info("%s: grey scale x %.4g to match the particles", path, a)
        scales.append(float(a))
        maps[k, 0] = maps[k, 1] = vol * a
    sigma2 = _shell_power(spectra, box)
    sigma2 = np.maximum(sigma2, 1e-3 * sigma2[1:].mean())
    res_px = resolution_limit_px(box * px / lowpass_A, box, px, config)
    _save_npz(out_refs, maps=maps)
    k_classes = len(models)
    model = {
        "iteration": 0,
        "n_particles": int(inf["n_particles"]),
        "box": box,
        "pixel_size": px,
        "n_classes": k_classes,
        "class_fractions": [1.0 / k_classes] * k_classes,
        "sigma2": sigma2.tolist(),
        "res_limit_px": res_px,
        "res_limit_A": box * px / res_px,
        "resolution_A": [lowpass_A] * k_classes,
        "grey_scales": scales,
        "changed_fraction": None,
        "hetrefine": __version__,
    }
    _write_json(out_model, model)


def resolution_limit_px(r: float, box: int, px: float, config: dict) -> float:
    """Clamp a resolution radius (box pixels) to [4, Nyquist - 1] and to max_resolution_A."""
    r_max = box / 2 - 1
    if config.get("max_resolution_A"):
        r_max = min(r_max, box * px / float(config["max_resolution_A"]))
    return float(min(max(r, 4.0), r_max))


# ---------------------------------------------------------------------------- align


def backprojection_radius(res_limit_px: float, box: int) -> float:
    """Radius (box pixels) up to which particles are backprojected: a margin beyond
    the alignment limit, so the half-set FSC can show that the resolution improved
    (as RELION backprojects within its current image size), never past Nyquist - 1.
    The sums grids, their files and the reconstruct memory shrink with it."""
    return float(min(box / 2 - 1, 1.25 * res_limit_px + 4))


def _rotation_grid(config: dict) -> np.ndarray:
    rots = so3_grid(float(config["coarse_angle_step_deg"]))
    sym = str(config.get("symmetry", "C1"))
    mats = symmetry_matrices(sym)
    if len(mats) > 1:
        rots = rots[asymmetric_unit_mask(rots, mats)]
    return rots


def align_shard(
    shard: str,
    refs: str,
    model: str,
    mask: str,
    iteration: int,
    out_assign: str,
    out_sums: str,
    config: dict,
) -> None:
    """Classify and align one shard against the previous references; write the
    assignments and this shard's backprojection sums per class and half-set."""
    t0 = time.time()
    xp = select_device(config.get("device", "auto"))
    mdl = _read_json(model)
    box, px = int(mdl["box"]), float(mdl["pixel_size"])
    n_total = int(mdl["n_particles"])
    maps = _load_npz(refs)["maps"]
    k_classes = maps.shape[0]
    mask_vol, _ = read_volume(mask)
    sh = _load_npz(shard)
    index, half = sh["index"], sh["half"].astype(int)

    input_poses = str(config.get("input_poses", "ignore"))
    if input_poses != "ignore" and "euler" not in sh:
        raise InputError(
            "config",
            f"input_poses: {input_poses} needs poses in the particle file "
            "(_rlnAngleRot/_rlnAngleTilt/_rlnAnglePsi, or alignments3D/pose in a .cs)",
            "input_poses",
        )
    sel = online_em_selection(index, n_total, k_classes, iteration, config)
    if input_poses != "ignore":
        given_euler, given_origin = sh["euler"][sel], sh["origin_A"][sel]
    index, half = index[sel], half[sel]
    images, ctf = sh["images"][sel], sh["ctf"][sel]
    n = len(index)
    settings = SearchSettings(
        box=box,
        pixel_size=px,
        res_limit_px=float(mdl["res_limit_px"]),
        coarse_step_deg=float(config["coarse_angle_step_deg"]),
        levels=int(config["local_refine_levels"]),
        shift_range_px=float(config["shift_range_px"]),
        shift_step_px=float(config["shift_step_px"]),
        pad=PAD,
        per_particle_scale=bool(config.get("per_particle_scale", False)),
    )
    sigma2 = np.asarray(mdl["sigma2"], dtype=np.float32)
    rots = _rotation_grid(config)
    n_sh = box // 2 + 1
    r_bp = backprojection_radius(settings.res_limit_px, box)
    ghalf = grid_half_size(box, PAD, r_bp)
    gsize = 2 * ghalf + 1
    n_packed = int(half_ball_mask(gsize).sum())  # sums kept on the Hermitian half ball
    num = np.zeros((k_classes, 2, n_packed), np.complex64)
    wgt = np.zeros((k_classes, 2, n_packed), np.float32)
    posterior = np.zeros((n, k_classes), np.float32)
    euler = np.zeros((n, k_classes, 3), np.float32)
    shift_A = np.zeros((n, k_classes, 2), np.float32)
    loglik = np.zeros((n, k_classes), np.float32)
    peak = np.zeros((n, k_classes), np.float32)
    noise_pow = np.zeros(n_sh)
    noise_cnt = np.zeros(n_sh)
    beta = 1.0 - anneal_similarity(iteration, config)
    prior = np.asarray(mdl["class_fractions"], dtype=np.float64)
    flat_f, kx_f, ky_f = half_plane_indices(box, r_bp, xp, include_dc=True)
    dc_w = xp.where((kx_f == 0) & (ky_f == 0), 0.5, 1.0).astype(xp.float32)
    shells_f = xp.rint(xp.sqrt(kx_f**2 + ky_f**2)).astype(xp.int64)
    inv_s2_f = xp.asarray(1.0 / sigma2)[shells_f].astype(xp.float32)
    freq = 1.0 / (box * px)
    for h in (0, 1):
        rows = np.flatnonzero(half == h)
        if len(rows) == 0:
            continue
        grids = [prepare_reference(xp.asarray(maps[k, h] * mask_vol), PAD) for k in range(k_classes)]
        spectra = rfft2_centered(xp.asarray(images[rows]))
        ctf_x = xp.asarray(ctf[rows])
        idx_h = index[rows]

        def worth_refining(evidence, idx_h=idx_h):
            p = class_posteriors(evidence, prior, beta, iteration, idx_h, config)
            return p > 1e-3  # the only pairs that are backprojected

        if input_poses == "ignore":
            res = search_poses(spectra, ctf_x, xp.asarray(sigma2), grids, rots, settings, worth_refining)
        else:
            given_r = euler_to_matrix(given_euler[rows])
            given_t = -given_origin[rows] / px  # RELION origin -> content shift in pixels
            res = search_around_given_poses(
                spectra, ctf_x, xp.asarray(sigma2), grids, given_r, given_t, settings,
                refine=input_poses == "local",
            )
        post = class_posteriors(res.coarse_evidence, prior, beta, iteration, idx_h, config)
        log.info(
            "half-set %s: %d particles aligned (%d of %d in this shard, %.1f s)",
            "AB"[h], len(rows), int((half <= h).sum()), n, time.time() - t0,
        )
        posterior[rows] = post
        euler[rows] = matrix_to_euler(res.rots)
        shift_A[rows] = -res.shifts * px  # RELION origin: the image moved by +origin is centred
        loglik[rows] = res.best_ll
        peak[rows] = res.pose_peak
        # backprojection and residual noise power at full resolution
        y = spectra.reshape(len(rows), -1)[:, flat_f]
        c = compute_ctf(ctf_x, kx_f * freq, ky_f * freq)
        best = post.argmax(axis=1)
        for k in range(k_classes):
            w = post[:, k]
            use = np.flatnonzero(w > 1e-3)
            if len(use) == 0:
                continue
            use_x = xp.asarray(use)  # device index (CuPy wants its own arrays)
            r_k = xp.asarray(res.rots[use, k])
            wk = xp.asarray(w[use])[:, None]
            ak = xp.asarray(res.scale[use, k].astype(np.float32))[:, None]  # per-particle scale
            c_k = c[use_x]
            y_k = y[use_x]
            # over the significant poses of the final local search (pose marginalisation);
            # the values are not centred: each pose's shift is applied in the kernel
            vals = wk * ak * c_k * y_k * (dc_w * inv_s2_f)[None, :]
            ws = wk * (ak * c_k) ** 2 * (dc_w * inv_s2_f)[None, :]
            n_acc = xp.zeros(n_packed, xp.complex128)
            w_acc = xp.zeros(n_packed, xp.float64)
            backproject_poses_packed(
                n_acc, w_acc, gsize, res.sig_rots[use, k], res.sig_shifts[use, k], res.sig_weights[use, k],
                kx_f, ky_f, vals, ws, box, PAD,
            )
            num[k, h], wgt[k, h] = to_host(n_acc), to_host(w_acc)
            mine = np.flatnonzero(best[use] == k)
            if len(mine):
                mx = xp.asarray(mine)
                ph = phase_shifts(kx_f, ky_f, xp.asarray(res.shifts[use[mine], k]), box)
                y_c = y_k[mx] * ph.conj()  # centred at the best pose
                a = project(grids[k], r_k[mx], kx_f, ky_f, PAD)
                resid = xp.abs(y_c - ak[mx] * c_k[mx] * a) ** 2
                noise_pow += to_host(
                    xp.bincount(shells_f, weights=resid.sum(axis=0), minlength=n_sh)
                )[:n_sh]
                noise_cnt += to_host(xp.bincount(shells_f, minlength=n_sh))[:n_sh] * len(mine)
    _save_npz(
        out_assign,
        index=index,
        half=half.astype(np.int8),
        posterior=posterior,
        euler=euler,
        shift=shift_A,
        loglik=loglik,
        pose_peak=peak,
        noise_power=noise_pow,
        noise_count=noise_cnt,
    )
    _save_npz(out_sums, num=num, wgt=wgt, grid_size=np.int64(gsize))
    log.info(
        "align iteration %d, %s: %d particles (%d of shard), classes %s, res limit %.1f A, %.1f s",
        iteration, Path(shard).name, n, len(sel), np.bincount(posterior.argmax(1), minlength=k_classes).tolist() if n else [],
        box * px / settings.res_limit_px, time.time() - t0,
    )


# ---------------------------------------------------------------------------- reconstruct


def _gather_sums(paths: list[str]):
    """Sum the shards' packed sums (Hermitian half ball, see ``projection.backproject_packed``)
    and unpack them: Friedel-complete cubes (..., n, n, n), complex128 / float64."""
    num = wgt = None
    size = None
    for p in sorted(paths):
        d = _load_npz(p)
        if num is None:
            num, wgt = d["num"].astype(np.complex128), d["wgt"].astype(np.float64)
            size = int(d["grid_size"])
        else:
            num += d["num"]
            wgt += d["wgt"]
    lead = num.shape[:-1]
    full_n = np.zeros((*lead, size, size, size), np.complex128)
    full_w = np.zeros((*lead, size, size, size), np.float64)
    for i in np.ndindex(*lead):
        full_n[i], full_w[i] = hermitian_unpack(num[i], wgt[i], size)
    return full_n, full_w


def _symmetrize(num, wgt, sym_mats):
    """Friedel-complete sums summed over the point group."""
    if len(sym_mats) > 1:
        num, wgt = symmetrize_fourier(num, sym_mats), symmetrize_fourier(wgt, sym_mats)
    return num, wgt


def _add_centered(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a + b for stacks of centred odd cubes (..., n, n, n) of possibly different n."""
    if a.shape[-1] < b.shape[-1]:
        a, b = b, a
    out = a.copy()
    o = (a.shape[-1] - b.shape[-1]) // 2
    sl = slice(o, o + b.shape[-1])
    out[..., sl, sl, sl] += b
    return out


def _half_maps(num, wgt, box: int, sym_mats, mask_vol, fudge: float):
    """Half-maps (2, D, D, D) and the masked half-set FSC from one class's sums.

    The FSC comes from lightly regularised maps (phase-randomisation corrected for the
    mask); its SNR then drives the Wiener filter of the returned maps."""
    filled = [_symmetrize(num[h], wgt[h], sym_mats) for h in (0, 1)]
    raw = [wiener_volume(n_h, w_h, box, PAD, None) for n_h, w_h in filled]
    curve = masked_fsc_corrected(raw[0], raw[1], mask_vol)
    snr = snr_from_fsc(curve, fudge)
    maps = np.stack([wiener_volume(n_h, w_h, box, PAD, snr) for n_h, w_h in filled])
    # the FSC of the Wiener-filtered maps is not used: where the filter suppresses a
    # shell, the mask leaks the (shared) low-resolution signal into it
    return maps, curve


def reconstruct(
    assign: list[str],
    sums: list[str],
    prev_model: str,
    prev_assign: list[str],
    mask: str,
    iteration: int,
    out_refs: str,
    out_model: str,
    config: dict,
) -> None:
    """Sum every shard's backprojections, make the half-maps per class, the FSC,
    resolution, noise spectrum and class statistics of this iteration."""
    t0 = time.time()
    mdl = _read_json(prev_model)
    box, px = int(mdl["box"]), float(mdl["pixel_size"])
    mask_vol, _ = read_volume(mask)
    num, wgt = _gather_sums(sums)
    decay = float(config.get("online_em_decay", 0.0))
    prev_refs = Path(prev_model).with_name("references.npz")
    if decay > 0 and prev_refs.exists():
        prev = _load_npz(prev_refs)
        if "num" in prev:
            num = _add_centered(num, decay * prev["num"])
            wgt = _add_centered(wgt, decay * prev["wgt"])
            log.info("online EM: previous sums added with decay %.2f", decay)
    k_classes = num.shape[0]
    sym_mats = symmetry_matrices(str(config.get("symmetry", "C1")))
    maps = np.zeros((k_classes, 2, box, box, box), np.float32)
    curves, res_A, shells = [], [], []
    for k in range(k_classes):
        if not np.any(wgt[k]):
            log.warning("class %d received no particles; keeping its previous map", k + 1)
            maps[k] = _load_npz(prev_refs)["maps"][k]
            curves.append(np.zeros(box // 2 + 1))
            res_A.append(None)
            shells.append(0.0)
            continue
        maps[k], curve = _half_maps(num[k], wgt[k], box, sym_mats, mask_vol, float(config["tau2_fudge"]))
        curves.append(curve)
        res_A.append(resolution_angstrom(curve, box, px))
        shells.append(resolution_shell(curve))

    # statistics from the assignments
    posts, idx, noise_p, noise_c = [], [], 0.0, 0.0
    for p in sorted(assign):
        d = _load_npz(p)
        posts.append(d["posterior"])
        idx.append(d["index"])
        noise_p = noise_p + d["noise_power"]
        noise_c = noise_c + d["noise_count"]
    post = np.concatenate(posts) if posts else np.zeros((0, k_classes))
    index = np.concatenate(idx) if idx else np.zeros(0, np.int64)
    fractions = post.sum(axis=0) / max(len(post), 1)
    fractions = np.maximum(fractions, 1e-3)
    fractions = (fractions / fractions.sum()).tolist()
    changed = None
    if prev_assign:
        prev_cls = {}
        for p in sorted(prev_assign):
            d = _load_npz(p)
            prev_cls.update(zip(d["index"].tolist(), d["posterior"].argmax(1).tolist()))
        cur = post.argmax(1)
        both = [(c, prev_cls[i]) for i, c in zip(index.tolist(), cur.tolist()) if i in prev_cls]
        if both:
            changed = float(np.mean([a != b for a, b in both]))
    sigma2_prev = np.asarray(mdl["sigma2"])
    sigma2 = np.where(np.asarray(noise_c) > 0, noise_p / np.maximum(noise_c, 1), sigma2_prev)
    sigma2 = np.maximum(sigma2, 1e-3 * float(np.mean(sigma2[1:])))
    best_shell = max(shells) if shells else 0.0
    res_px = resolution_limit_px(
        max(float(mdl["res_limit_px"]), best_shell + 3.0), box, px, config
    )
    n_iter = int(config["iterations"])
    extra = {}
    if decay > 0 and iteration < int(config.get("online_em_iterations", 0)):
        extra = {"num": num.astype(np.complex64), "wgt": wgt.astype(np.float32)}
    _save_npz(out_refs, maps=maps, **extra)
    stats = {
        "iteration": iteration,
        "n_iterations": n_iter,
        "n_particles": int(mdl["n_particles"]),
        "n_particles_used": int(len(post)),
        "box": box,
        "pixel_size": px,
        "n_classes": k_classes,
        "class_fractions": fractions,
        "class_sizes_hard": np.bincount(post.argmax(1), minlength=k_classes).tolist() if len(post) else [0] * k_classes,
        "changed_fraction": changed,
        "posterior_entropy": posterior_entropy(post),
        "fsc": [c.tolist() for c in curves],
        "resolution_A": res_A,
        "sigma2": sigma2.tolist(),
        "res_limit_px": res_px,
        "res_limit_A": box * px / res_px,
        "res_used_A": box * px / float(mdl["res_limit_px"]),
        "converged": bool(
            changed is not None
            and changed < 0.01
            and abs(res_px - float(mdl["res_limit_px"])) < 1.0
        ),
        "hetrefine": __version__,
    }
    _write_json(out_model, stats)
    log.info(
        "iteration %d: %d particles, class sizes %s, resolution %s A, changed %s, "
        "next limit %.1f A, entropy %.3f%s, %.1f s",
        iteration,
        len(post),
        stats["class_sizes_hard"],
        [f"{r:.1f}" if r else "-" for r in res_A],
        f"{changed:.3f}" if changed is not None else "-",
        stats["res_limit_A"],
        stats["posterior_entropy"],
        ", converged" if stats["converged"] else "",
        time.time() - t0,
    )


# ---------------------------------------------------------------------------- final


def hard_sums(shard: str, assign: str, out_sums: str, config: dict) -> None:
    """Backproject each particle into its hard-assigned class only (both half-sets
    together) at its best pose, for the hard-assignment maps."""
    xp = select_device(config.get("device", "auto"))
    sh = _load_npz(shard)
    a = _load_npz(assign)
    order = {int(i): j for j, i in enumerate(sh["index"].tolist())}
    rows = np.array([order[int(i)] for i in a["index"]], dtype=np.int64)
    images, ctf = sh["images"][rows], sh["ctf"][rows]
    post = a["posterior"]
    k_classes = post.shape[1]
    box = images.shape[-1]
    px = _refinement_pixel_size(shard)
    ghalf = grid_half_size(box, PAD)
    gsize = 2 * ghalf + 1
    n_packed = int(half_ball_mask(gsize).sum())
    num = np.zeros((k_classes, n_packed), np.complex64)
    wgt = np.zeros((k_classes, n_packed), np.float32)
    flat, kx, ky = half_plane_indices(box, box / 2 - 1, xp, include_dc=True)
    dc_w = xp.where((kx == 0) & (ky == 0), 0.5, 1.0).astype(xp.float32)
    freq = 1.0 / (box * px)
    y = rfft2_centered(xp.asarray(images)).reshape(len(rows), -1)[:, flat]
    c = compute_ctf(xp.asarray(ctf), kx * freq, ky * freq)
    cls = post.argmax(1)

    for k in range(k_classes):
        use = np.flatnonzero(cls == k)
        if len(use) == 0:
            continue
        r = xp.asarray(euler_to_matrix(a["euler"][use, k]).astype(np.float32))
        t = xp.asarray(-a["shift"][use, k] / px)
        ph = phase_shifts(kx, ky, t, box)
        n_acc = xp.zeros(n_packed, xp.complex128)
        w_acc = xp.zeros(n_packed, xp.float64)
        ux = xp.asarray(use)
        backproject_packed(
            n_acc, w_acc, gsize, r, kx, ky, dc_w * c[ux] * y[ux] * ph.conj(), dc_w * c[ux] ** 2, PAD
        )
        num[k], wgt[k] = to_host(n_acc), to_host(w_acc)
    _save_npz(out_sums, num=num, wgt=wgt, grid_size=np.int64(gsize))


def _refinement_pixel_size(shard: str) -> float:
    """The refinement pixel size, from the preprocess info.json beside the shard."""
    info = Path(shard).with_name("info.json")
    return float(_read_json(info)["pixel_size"])


def hard_maps(sums: list[str], box: int, config: dict, fsc_curves=None) -> np.ndarray:
    """Maps (K, D, D, D) from the hard-assignment sums (both half-sets together).

    Wiener-filtered with the full-data SNR, 2 FSC / (1 - FSC), from the last
    iteration's half-set FSC of each class (``fsc_curves``); without it, a small
    constant regulariser (no filter).
    """
    num, wgt = _gather_sums(sums)
    sym_mats = symmetry_matrices(str(config.get("symmetry", "C1")))
    fudge = float(config.get("tau2_fudge", 1.0))
    out = []
    for k in range(num.shape[0]):
        n_k, w_k = _symmetrize(num[k], wgt[k], sym_mats)
        snr = None
        if fsc_curves is not None and np.any(fsc_curves[k]):
            snr = 2.0 * snr_from_fsc(fsc_curves[k], fudge)  # both halves together
        out.append(wiener_volume(n_k, w_k, box, PAD, snr))
    return np.stack(out)


def write_classes(
    metadata: str,
    info: str,
    assign: list[str],
    hard_sums: list[str],
    refs: str,
    model: str,
    mask: str,
    out_dir: str,
    config: dict,
) -> None:
    """Final outputs: particles_all.star, per-class folders, volumes_all.zip."""
    import pandas as pd

    from hetrefine.outputs import assemble_assignments, write_final_outputs

    inf = _read_json(info)
    mdl = _read_json(model)
    table = pd.read_pickle(metadata)
    a = assemble_assignments(assign, len(table))
    maps = _load_npz(refs)["maps"]
    mask_vol, _ = read_volume(mask)
    box = int(inf["box"])
    curves = [np.asarray(c) for c in mdl["fsc"]]
    hm = hard_maps(hard_sums, box, config, curves) if hard_sums else None
    write_final_outputs(table, a, maps, hm, mask_vol, curves, float(inf["pixel_size"]), out_dir)
    log.info("final outputs written to %s", out_dir)


def make_plots(models: list[str], refs: list[str], assign: list[str], out_dir: str, config: dict) -> None:
    """Every run-level figure from the iterations' statistics and maps."""
    from hetrefine.outputs import assemble_assignments
    from hetrefine.plots import make_all_plots

    mdls = [_read_json(p) for p in models]
    maps = [_load_npz(p)["maps"].mean(axis=1) for p in refs]
    n = int(mdls[-1]["n_particles"])
    a = assemble_assignments(assign, n)
    make_all_plots(mdls, maps, a, out_dir, pixel_size=float(mdls[-1]["pixel_size"]))
