"""Junk by fit score: each class's fit scores centred on that class's own typical
particle, so that one ``junk_fit_score`` threshold means the same in every class.

The fit score (``classification.fit_score``) is ~N(0, 1) for a particle its class
explains exactly; in practice a class's good particles sit off zero by an amount that
depends on the class (how well its map is resolved, how much of the box its mask
holds, how much its poses are blurred by a neighbouring state). Centring each class on
its median particle takes that offset out: a good particle then scores ~N(0, 1) in any
class, and junk assigned to a protein class stands out below it. A class holding
mostly junk (a decoy) centres on its junk; its particles are left out as the decoy's
anyway.

The centres are measured by reconstruct over the whole data set (model.json
``fit_score_centre``) and applied by every reader of the final assignments
(``centred_assignments``): the hard-assignment maps, the exported ``hrFitScore``, the
junk flag and the histogram see the same numbers.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from hetrefine.classification import hard_classes


def class_centres(score: np.ndarray, classes: np.ndarray, n_classes: int) -> list[float]:
    """Per-class median (K,) of the finite scores of the particles in each class
    (0-based ``classes``); 0 for a class without any."""
    score = np.asarray(score, np.float64)
    classes = np.asarray(classes)
    out = []
    for k in range(n_classes):
        s = score[(classes == k) & np.isfinite(score)]
        out.append(float(np.median(s)) if len(s) else 0.0)
    return out


def centred(score: np.ndarray, classes: np.ndarray, centres) -> np.ndarray:
    """``score`` (n,) minus the centre of each particle's class (float32; NaN stays NaN,
    a class index outside the centres is left uncentred)."""
    score = np.asarray(score, np.float64)
    classes = np.asarray(classes, np.int64)
    c = np.asarray(centres, np.float64)
    ok = (classes >= 0) & (classes < len(c))
    shift = np.zeros(score.shape)
    shift[ok] = c[classes[ok]]
    return (score - shift).astype(np.float32)


def centred_assignments(assign: Mapping, model: Mapping) -> dict:
    """The assignments with ``fit_score`` centred by the model's ``fit_score_centre``
    (a new dict; unchanged when either is absent: runs from before the centring)."""
    out = dict(assign)
    centres = model.get("fit_score_centre")
    if centres is None or "fit_score" not in assign:
        return out
    out["fit_score"] = centred(assign["fit_score"], hard_classes(assign["posterior"]), centres)
    return out
