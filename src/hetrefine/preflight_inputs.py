"""The pre-flight's look at the maps a run is given: each initial model and the focused
mask read and checked as the run's steps do (:mod:`hetrefine.validation`), with what
the run will do to them (resampling, softening) and warnings the steps cannot give
(two initial models nearly identical). Findings go to the pre-flight's report (any
object with ``info``, ``warn`` and ``error``: :class:`hetrefine.preflight.Report`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from hetrefine.errors import InputError


def check_focus_mask(m: dict, work: Path, rep, box: int, px: float, in_px: float):
    """mask.file, read and checked as the mask step does, and what the step will do with it."""
    from hetrefine.io.mrc import MrcError
    from hetrefine.mask import focus_mask_summary
    from hetrefine.validation import read_focus_mask

    try:
        vol, vpx = read_focus_mask(work / m["file"])
    except (MrcError, InputError) as exc:
        return rep.error(f"mask.file: {exc}")
    summary = focus_mask_summary(vol, vpx if vpx > 0 else in_px, box, px, m["soft_edge_A"])
    rep.info(f"mask.file {m['file']}: {summary}; applied for {m['apply_to']}")


def check_models(config, work: Path, rep, box, px, in_box, in_px, demo_missing):
    """Read each initial model; report its box/pixel size and what happens to it."""
    from hetrefine.fourier import resample_volume
    from hetrefine.io.mrc import MrcError
    from hetrefine.validation import check_model_extent, read_initial_model

    demo_models = set()
    if demo_missing:
        from hetrefine.config import demo_initial_models

        demo_models = {os.path.normpath(p) for p in demo_initial_models(config["demo"])}
    vols = []
    for path in config["initial_models"]:
        if os.path.normpath(path) in demo_models:
            rep.info(f"initial model {path}: written by the demo simulation")
            vols.append(None)
            continue
        try:
            vol, vpx = read_initial_model(work / path)
        except (MrcError, InputError) as exc:
            rep.error(f"initial model: {exc}")
            vols.append(None)
            continue
        n = vol.shape[0]
        note = ""
        if vpx <= 0:
            vpx = in_px
            rep.warn(
                f"{path}: no pixel size in the header; the particles' {in_px:.4g} A is assumed"
            )
        try:
            if warning := check_model_extent(path, n, vpx, in_box, in_px):
                rep.warn(warning)
        except InputError as exc:
            rep.error(f"initial model: {exc}")
            vols.append(None)
            continue
        if n != box or abs(vpx - px) > 1e-3 * px:
            note = f"; resampled to box {box} at {px:.4g} A/px"
        rep.info(f"initial model {path}: box {n} px at {vpx:.4g} A/px{note}")
        vols.append(resample_volume(vol, vpx, box, px))
    real = [(p, v) for p, v in zip(config["initial_models"], vols) if v is not None]
    for i in range(len(real)):
        for j in range(i + 1, len(real)):
            a, b = real[i][1].ravel(), real[j][1].ravel()
            a, b = a - a.mean(), b - b.mean()
            cc = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))
            if cc > 0.995:
                rep.warn(
                    f"{real[i][0]} and {real[j][0]} are nearly identical (correlation "
                    f"{cc:.4f}); the run splits their particles in iteration 1 by "
                    "how well the map explains each and may need more iterations to separate the classes"
                )
    return vols
