"""Step of rule `make_mask`: the soft spherical mask at the refinement box, and the
mask the references are masked with for alignment and/or classification: the focused
mask (``mask.file`` resampled to the refinement box); without one, the solvent mask
from the initial models' envelope (``mask.solvent``, :func:`hetrefine.mask.solvent_mask`);
else the spherical mask."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from hetrefine.errors import InputError
from hetrefine.fourier import resample_volume
from hetrefine.io import run_files
from hetrefine.io.mrc import write_mrc
from hetrefine.mask import SOLVENT_LOWPASS_A, envelope, focus_mask, soft_sphere, solvent_mask
from hetrefine.validation import check_mask_fits, read_focus_mask, read_initial_model

log = logging.getLogger("hetrefine")

SMALL_FOCUS = 0.3
"""With ``mask.apply_to: both``, a focused mask under this fraction of the spherical mask's
volume gets a warning (aligning on a small region fails at low SNR; see hetrefine.focus)."""


def make_mask(
    info: str, out_mask: str, out_focus_mask: str, models: Sequence[str], settings: Mapping
) -> None:
    """Soft spherical mask (ones when the mask is disabled) into ``out_mask``; the
    references' mask into ``out_focus_mask``: ``mask.file`` at the refinement box, else
    (``mask.solvent``) the solvent mask from the initial models ``models``, else the
    spherical mask."""
    inf = run_files.read_info(info)
    box, px = int(inf["box"]), float(inf["pixel_size"])
    m = settings["mask"]
    inner, outer = check_mask_fits(
        box, px, settings["particle_diameter_A"], m["inner_diameter_A"], m["outer_diameter_A"],
        m["enabled"],
    )  # fmt: skip
    if not m["enabled"]:
        mask = np.ones((box,) * 3, np.float32)
        log.info("mask disabled: using ones")
    else:
        mask = soft_sphere(box, px, inner, outer)
        log.info("mask: inner %.1f A, outer %.1f A, box %d at %.3f A/px", inner, outer, box, px)
    focus = mask
    if m["file"]:
        focus = _focused(m, box, px, float(inf["input_pixel_size"]), mask)
        if m["solvent"]:
            log.info("mask.file is given: it is used instead of the solvent mask (mask.solvent)")
    elif m["solvent"] and models:
        focus = _solvent(models, m, box, px, float(inf["input_pixel_size"]), mask)
    elif m["solvent"]:
        log.warning("mask.solvent: no initial models given to the mask step; spherical mask only")
    else:
        log.info("no mask.file: the references are masked with the spherical mask only")
    write_mrc(out_mask, mask, px)
    write_mrc(out_focus_mask, focus, px)


def _focused(m: Mapping, box: int, px: float, input_px: float, sphere: np.ndarray) -> np.ndarray:
    """``mask.file`` at the refinement box, with what was done logged."""
    path = m["file"]
    vol, vpx = read_focus_mask(path)
    n = vol.shape[0]
    if vpx <= 0:
        vpx = input_px
        log.warning("%s: no pixel size in the header; assuming the particles' %.3f A", path, vpx)
    focus, binary = focus_mask(vol, vpx, box, px, float(m["soft_edge_A"]))
    if not focus.any():
        raise InputError(
            path,
            f"the mask keeps nothing at the refinement box ({box} px at {px:.3f} A/px; the mask "
            f"is {n} px at {vpx:.3f} A/px): is its pixel size right?",
            "key 'mask.file'",
        )
    if n != box or abs(vpx - px) > 1e-3 * px:
        log.info(
            "mask.file %s: resampled from box %d at %.3f A/px to box %d at %.3f A/px",
            path, n, vpx, box, px,
        )  # fmt: skip
    else:
        log.info("mask.file %s: box %d at %.3f A/px, as the refinement", path, n, vpx)
    edge = float(m["soft_edge_A"])
    if binary and edge > 0:
        log.info(
            "mask.file is binary (only 0 and 1): softened with a raised-cosine edge of %.1f A "
            "(%.1f px) outside it (mask.soft_edge_A)", edge, edge / px,
        )  # fmt: skip
    elif binary:
        log.warning(
            "mask.file is binary (only 0 and 1) and mask.soft_edge_A is 0: used with its hard "
            "edge, which rings in Fourier space; a soft edge of a few pixels is safer"
        )
    else:
        log.info("mask.file has soft values: used as it is (clipped to [0, 1] after resampling)")
    kept = float(focus.sum()) / max(float(sphere.sum()), 1e-30)
    log.info(
        "focused mask: %.3g of the spherical mask's volume; applied to the references for %s",
        kept,
        "alignment and classification"
        if m["apply_to"] == "both"
        else "classification (the whole particle aligns; only the masked region classifies)",
    )
    inside = float((focus * sphere).sum()) / float(focus.sum())
    if inside < 0.5:
        log.warning(
            "%.0f%% of mask.file lies outside the spherical mask (particle_diameter_A): is it "
            "centred on the particle, and is its pixel size right?", 100 * (1 - inside),
        )  # fmt: skip
    if m["apply_to"] == "both" and kept < SMALL_FOCUS:
        log.warning(
            "mask.file keeps %.0f%% of the particle and mask.apply_to is both: the particles are "
            "aligned on that region alone, and the rest of each particle, which projects onto "
            "the same pixels, reads as density in it; to sort on a domain, use "
            "mask.apply_to: classification", 100 * kept,
        )  # fmt: skip
    return focus


def _solvent(
    models: Sequence[str], m: Mapping, box: int, px: float, input_px: float, sphere: np.ndarray
) -> np.ndarray:
    """The solvent mask from the initial models ``models`` at the refinement box, with
    its thresholds and volume logged."""
    vols = []
    for path in models:
        vol, vpx = read_initial_model(path)
        vols.append(resample_volume(vol, vpx if vpx > 0 else input_px, box, px))
    thr, extend, edge = (
        float(m["solvent_threshold"]),
        float(m["solvent_extend_A"]),
        float(m["soft_edge_A"]),
    )
    for path, vol in zip(models, vols, strict=True):
        inside, level = envelope(vol, px, thr, sphere)
        log.info(
            "solvent mask: %s low-passed to %.0f A, thresholded at %.4g (%.2f of its maximum "
            "above the solvent): %.3g of the spherical mask's volume",
            path, max(SOLVENT_LOWPASS_A, 2 * px), level, thr, inside.sum() / max(sphere.sum(), 1e-30),
        )  # fmt: skip
    solvent = solvent_mask(vols, px, sphere, thr, extend, edge)
    log.info(
        "solvent mask: union of the %d envelopes, extended by %.1f A, raised-cosine edge %.1f A "
        "(mask.soft_edge_A), times the spherical mask: %.3g of the spherical mask's volume; "
        "applied to the references for alignment, classification and the noise power",
        len(vols), extend, edge, float(solvent.sum()) / max(float(sphere.sum()), 1e-30),
    )  # fmt: skip
    return solvent
