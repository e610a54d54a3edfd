"""Step of rule `make_mask`: the soft spherical mask at the refinement box."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from hetrefine.errors import InputError
from hetrefine.io import run_files
from hetrefine.io.mrc import write_mrc
from hetrefine.mask import mask_diameters, soft_sphere

log = logging.getLogger("hetrefine")


def make_mask(info: str, out_mask: str, settings: Mapping) -> None:
    """Soft spherical mask (ones when the mask is disabled) into ``out_mask``."""
    inf = run_files.read_info(info)
    box, px = int(inf["box"]), float(inf["pixel_size"])
    m = settings["mask"]
    inner, outer = mask_diameters(
        box, px, settings["particle_diameter_A"], m["inner_diameter_A"], m["outer_diameter_A"]
    )
    if not m["enabled"]:
        mask = np.ones((box,) * 3, np.float32)
        log.info("mask disabled: using ones")
    else:
        if inner > box * px * 1.0001 or outer > box * px * 1.0001:
            key = (
                "mask.inner_diameter_A" if m["inner_diameter_A"] else
                "particle_diameter_A" if settings["particle_diameter_A"] else "mask.outer_diameter_A"
            )  # fmt: skip
            raise InputError(
                "config",
                f"mask diameter {max(inner, outer):.1f} A is larger than the box "
                f"({box} px x {px:.3f} A = {box * px:.1f} A); use at most {box * px:.1f} A",
                key,
            )
        mask = soft_sphere(box, px, inner, outer)
        log.info("mask: inner %.1f A, outer %.1f A, box %d at %.3f A/px", inner, outer, box, px)
    write_mrc(out_mask, mask, px)
