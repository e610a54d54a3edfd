"""Step of rule `write_classes`: the user-facing outputs (particles_all.star/.cs,
per-class folders with maps, half-maps, hard-assignment map, FSC; volumes_all.zip)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from hetrefine.classification import fit_score_flags
from hetrefine.convergence import stop_summary
from hetrefine.export import reported_assignments, write_final_outputs
from hetrefine.io import run_files
from hetrefine.io.mrc import read_volume
from hetrefine.mask import particle_diameter
from hetrefine.reconstruction import hard_maps, unpack_sums
from hetrefine.symmetry import symmetry_matrices

log = logging.getLogger("hetrefine")


def write_classes(
    metadata: str,
    info: str,
    assign: list[str],
    hard_sums: list[str],
    refs: str,
    model: str,
    mask: str,
    out_dir: str,
    settings: Mapping,
) -> None:
    """Every final file under ``out_dir`` (the run folder)."""
    inf = run_files.read_info(info)
    mdl = run_files.read_model(model)
    table = run_files.read_metadata(metadata)
    a = reported_assignments(assign, len(table), mdl, settings["self_evidence_correction"])
    maps = run_files.read_references(refs)["maps"]
    mask_vol, _ = read_volume(mask)
    box = int(inf["box"])
    curves = [np.asarray(c) for c in mdl["fsc"]]
    hm = None
    if hard_sums:
        num, wgt = unpack_sums(*run_files.add_sums(hard_sums))
        sym_mats = symmetry_matrices(str(settings["symmetry"]))
        hm = hard_maps(num, wgt, box, sym_mats, float(settings["tau2_fudge"]), curves)
    px = float(inf["pixel_size"])
    junk = settings["junk_fit_score"]
    if junk is not None and "fit_score" in a:
        flagged = fit_score_flags(a["fit_score"], junk)
        log.info(
            "%d of %d particles have a fit score below junk_fit_score = %g: flagged as junk "
            "(hrJunkByFitScore) and left out of the classes", int(flagged.sum()), len(flagged), junk,
        )  # fmt: skip
    elif junk is not None:
        log.warning("junk_fit_score is set but the assignments hold no fit score: nothing flagged")
        junk = None
    in_box, in_px = int(inf["input_box"]), float(inf["input_pixel_size"])
    write_final_outputs(
        table, a, maps, hm, mask_vol, curves, px, out_dir,
        full_box=(in_box, in_px) if in_box > box else None,
        particle_radius_A=particle_diameter(settings["particle_diameter_A"], box, px) / 2,
        junk_fit_score=None if junk is None else float(junk),
    )  # fmt: skip
    log.info("final outputs written to %s", out_dir)
    # at which iteration the run stopped and why, or why it never converged
    (log.info if mdl.get("converged") else log.warning)("refinement %s", stop_summary(mdl))
