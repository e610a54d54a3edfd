"""A focused mask (``mask.file``) in the alignment: the references the pose search and
the class evidence use, and those the residual noise power is measured against.

- ``mask.apply_to: both`` (RELION's reference mask, ``--solvent_mask``): each reference
  is multiplied by the focused mask instead of the spherical one, for the pose search
  and the class evidence alike. For a mask that leaves out what should not drive
  either (a detergent micelle, a flexible arm); the density outside the mask is then
  unmodelled signal in the particles.
- ``mask.apply_to: classification`` (focused classification): inside the mask each
  class keeps its own reference, outside it every class gets the same density, the
  mean of the classes' references weighted by the class fractions. The whole particle
  still aligns each particle (the references are whole particles under the spherical
  mask), and only the masked region tells the classes apart. This is what subtracting
  the rest's signal from the particles does (RELION's focused classification with
  signal subtraction: |Y - P(M A_k + (1 - M) A_mean)|^2 = |(Y - P((1 - M) A_mean)) -
  P(M A_k)|^2), without changing the particles. Multiplying the references by a small
  mask instead would read the rest of the particle, which projects onto the same
  pixels, as extra density in the mask, and favour the class with more density there.

Either way the residual noise power (the particles' noise model, ``sigma2``) is
measured against the references under the spherical mask, as without a focused mask.
The particle images are never masked.

Without ``mask.file``, the solvent mask (``mask.solvent``: the initial models' envelope,
:func:`hetrefine.mask.solvent_mask`) takes the spherical mask's place in the references
for the search, the class evidence and the noise power alike.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ReferenceMasks:
    """The spherical mask and, when ``mask.file`` is set, the focused mask (D, D, D) and
    ``mask.apply_to`` (``both`` or ``classification``)."""

    sphere: np.ndarray
    focus: np.ndarray | None = None
    apply_to: str = "both"

    @property
    def focused(self) -> bool:
        return self.focus is not None


def reference_masks(
    sphere: np.ndarray, focus: np.ndarray | None, mask_settings: Mapping
) -> ReferenceMasks:
    """The :class:`ReferenceMasks` for the spherical mask ``sphere``, the focused mask
    ``focus`` (None, or ignored, when ``mask.file`` is not set) and the ``mask`` settings.
    Without ``mask.file`` and with ``mask.solvent``, ``focus`` is the solvent mask and
    replaces the spherical mask."""
    if focus is None:
        return ReferenceMasks(sphere)
    if not mask_settings["file"]:
        return ReferenceMasks(focus if mask_settings.get("solvent") else sphere)
    return ReferenceMasks(sphere, focus, str(mask_settings["apply_to"]))


def search_references(maps: np.ndarray, masks: ReferenceMasks, fractions) -> Iterator[np.ndarray]:
    """The references (D, D, D) float32 the pose search and the class evidence use, one
    class at a time (one volume in memory besides the maps), from one half-set's maps
    (K, D, D, D) and the class fractions (K,): the maps under the spherical mask; with a
    focused mask, as ``masks.apply_to`` says (module docstring)."""
    mean = None
    if masks.focused and masks.apply_to == "classification":
        w = np.asarray(fractions, np.float64)
        mean = np.tensordot(w / w.sum(), maps, axes=1) * masks.sphere
    for vol in maps:
        if not masks.focused:
            yield (vol * masks.sphere).astype(np.float32)
        elif mean is None:
            yield (vol * masks.focus).astype(np.float32)
        else:
            yield (masks.focus * (vol * masks.sphere) + (1.0 - masks.focus) * mean).astype(
                np.float32
            )


def noise_reference(vol: np.ndarray, masks: ReferenceMasks) -> np.ndarray | None:
    """The reference (D, D, D) the residual noise power is measured against when it
    differs from the search's (a focused mask), else None: the map ``vol`` under the
    spherical mask, so the noise model does not change with a focused mask."""
    return (vol * masks.sphere).astype(np.float32) if masks.focused else None
