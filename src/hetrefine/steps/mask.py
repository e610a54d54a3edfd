"""Step of rule `make_mask`: the soft spherical mask at the refinement box."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from hetrefine.io import run_files
from hetrefine.io.mrc import write_mrc
from hetrefine.mask import soft_sphere
from hetrefine.validation import check_mask_fits

log = logging.getLogger("hetrefine")


def make_mask(info: str, out_mask: str, settings: Mapping) -> None:
    """Soft spherical mask (ones when the mask is disabled) into ``out_mask``."""
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
    write_mrc(out_mask, mask, px)
