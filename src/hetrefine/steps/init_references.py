"""Step of rule `init_references`: the initial models resampled to the refinement box,
put on the particles' grey scale and low-passed; iteration 0's statistics."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from hetrefine import __version__
from hetrefine.errors import InputError
from hetrefine.fourier import lowpass_volume, resample_volume, rfft2_centered
from hetrefine.greyscale import estimate_grey_scale
from hetrefine.io import run_files
from hetrefine.io.mrc import read_volume
from hetrefine.mask import particle_diameter
from hetrefine.noise import group_shell_power, image_shell_power
from hetrefine.schedule import resolution_limit_px, start_resolution_for_maps
from hetrefine.starts import same_map_fit_cuts, same_map_groups, same_map_pairs
from hetrefine.validation import check_model_extent, read_initial_model

log = logging.getLogger("hetrefine")


def init_references(
    models: list[str],
    info: str,
    sample: str,
    mask: str,
    out_refs: str,
    out_model: str,
    settings: Mapping,
) -> None:
    """Write iteration 0's references (K, 2, D, D, D) and statistics.

    ``sample``: preprocess's ``sample.npz`` (a seeded sample of the whole stack; any
    shard file also works)."""
    inf = run_files.read_info(info)
    box, px = int(inf["box"]), float(inf["pixel_size"])
    mask_vol, _ = read_volume(mask)
    sh = run_files.read_sample(sample)
    imgs, ctf = sh["images"][:300], sh["ctf"][:300]
    given = [read_initial_model(p) for p in models]  # (volume, voxel size), read once
    lowpass_A = settings["initial_lowpass_A"]
    if lowpass_A is None:  # the start follows the particle's size in the initial models
        lowpass_A = start_resolution_for_maps(given, box, px, float(inf["input_pixel_size"]))
        log.info("start resolution %.1f A (from the particle's size)", lowpass_A)
    lowpass_A = float(lowpass_A)
    radius_px = particle_diameter(settings["particle_diameter_A"], box, px) / 2 / px
    spectra = rfft2_centered(imgs)
    maps = np.zeros((len(models), 2, box, box, box), np.float32)
    scales = []
    for k, (path, (vol, vpx)) in enumerate(zip(models, given, strict=True)):
        if vpx <= 0:
            vpx = float(inf["input_pixel_size"])
            log.warning(
                "%s: no pixel size in the header; assuming the particles' %.3f A", path, vpx
            )
        if warning := check_model_extent(
            path, vol.shape[0], vpx, int(inf["input_box"]), float(inf["input_pixel_size"])
        ):
            log.warning("%s", warning)
        if vol.shape[0] != box or abs(vpx - px) > 1e-3 * px:
            log.info(
                "%s: resampled from box %d at %.3f A/px to box %d at %.3f A/px",
                path, vol.shape[0], vpx, box, px,
            )  # fmt: skip
        vol = resample_volume(vol, vpx, box, px)
        vol = lowpass_volume(vol, lowpass_A, px)
        if not np.any(vol):
            raise InputError(path, "initial model is empty (all zero after resampling)")
        a = estimate_grey_scale(
            vol, imgs, spectra, ctf, mask_vol, px, radius_px, int(settings["seed"])
        )
        if a < 0:
            log.warning(
                "%s: contrast looks inverted relative to the particles (scale %.3g); flipped",
                path,
                a,
            )
        log.info("%s: grey scale x %.4g to match the particles", path, a)
        scales.append(float(a))
        maps[k, 0] = maps[k, 1] = vol * a
    groups = _same_map_groups(
        models, maps[:, 0], box * px / lowpass_A, lowpass_A, float(settings["same_map_fsc"])
    )
    for g in groups:  # one map: their mean (what differs is noise)
        maps[g] = maps[g].mean(axis=0)
    sigma2 = image_shell_power(spectra, box)
    n_groups = len(inf.get("optics_groups", ()))
    group_noise = {}
    if n_groups > 1 and "group" in sh:  # a spectrum per optics group
        g_sigma2 = group_shell_power(spectra, box, sh["group"][:300], n_groups)
        group_noise = {"sigma2_groups": g_sigma2.tolist()}
    res_px = resolution_limit_px(box * px / lowpass_A, box, px, settings["max_resolution_A"])
    cuts = []
    if groups:  # iteration 1 splits each group's particles by their fit to its map
        s2 = g_sigma2[sh["group"][:300]] if group_noise else sigma2
        cuts = same_map_fit_cuts(
            maps[:, 0], groups, spectra, ctf, s2, mask_vol, settings, px, res_px
        )
    run_files.write_references(out_refs, maps)
    k_classes = len(models)
    run_files.write_model(
        out_model,
        {
            "iteration": 0,
            "n_particles": int(inf["n_particles"]),
            "box": box,
            "pixel_size": px,
            "n_classes": k_classes,
            "class_fractions": [1.0 / k_classes] * k_classes,
            "sigma2": sigma2.tolist(),
            **group_noise,
            "res_limit_px": res_px,
            "res_limit_A": box * px / res_px,
            "resolution_A": [lowpass_A] * k_classes,
            "grey_scales": scales,
            "same_map_groups": groups,
            "same_map_fit_cuts": cuts,
            "changed_fraction": None,
            "hetrefine": __version__,
        },
    )


def _same_map_groups(
    models: list[str], maps, radius_px: float, lowpass_A: float, threshold: float
) -> list[list[int]]:
    """Groups of initial models that are one map at the start resolution (K copies of
    a consensus, or maps that differ only by noise), said in the log; they start as
    their mean, and iteration 1 splits the group's particles among its classes by how
    well the map explains each of them (:func:`hetrefine.starts.split_same_map_groups`)."""
    groups = same_map_groups(len(models), same_map_pairs(maps, radius_px, threshold))
    for g in groups:
        log.warning(
            "initial models %s are the same map up to %.0f A (FSC >= %.2f): they start as "
            "their mean, and iteration 1 splits their particles among these %d classes by "
            "how well the map explains each (best first), and the classes separate from there "
            "(same_map_fsc: 1 groups only copies of one map)",
            ", ".join(f"{k + 1} ({models[k]})" for k in g), lowpass_A, threshold, len(g),
        )  # fmt: skip
    return groups
