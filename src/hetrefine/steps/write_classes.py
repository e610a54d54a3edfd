"""Step of rule `write_classes`: the user-facing outputs (particles_all.star/.cs,
per-class folders with maps, half-maps, hard-assignment map, FSC; volumes_all.zip)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from hetrefine.export import write_final_outputs
from hetrefine.io import run_files
from hetrefine.io.mrc import read_volume
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
    a = run_files.assemble_assignments(assign, len(table))
    maps = run_files.read_references(refs)["maps"]
    mask_vol, _ = read_volume(mask)
    box = int(inf["box"])
    curves = [np.asarray(c) for c in mdl["fsc"]]
    hm = None
    if hard_sums:
        num, wgt = unpack_sums(*run_files.add_sums(hard_sums))
        sym_mats = symmetry_matrices(str(settings["symmetry"]))
        hm = hard_maps(num, wgt, box, sym_mats, float(settings["tau2_fudge"]), curves)
    write_final_outputs(table, a, maps, hm, mask_vol, curves, float(inf["pixel_size"]), out_dir)
    log.info("final outputs written to %s", out_dir)
