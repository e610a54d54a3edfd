"""Step of rule `plots`: every figure of a run, each drawn once (``hetrefine.plots``)."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

from hetrefine.export import reported_assignments
from hetrefine.io import run_files
from hetrefine.io.atomic import atomic_path
from hetrefine.plots import make_all_plots


def make_plots(
    models: list[str],
    refs: list[str],
    assign: list[str],
    out_dir: str,
    class_orientations: list[str],
    settings: Mapping,
) -> None:
    """The run-level figures and the summary page into ``out_dir`` (``plots/``), and each
    class's orientation map also as ``class_orientations[k]`` (``class_XXX/orientations.png``,
    a copy). ``settings``: the run's config (recorded on the summary page)."""
    mdls = [run_files.read_model(p) for p in models]
    maps = [run_files.read_references(p)["maps"].mean(axis=1) for p in refs]
    a = reported_assignments(  # as exported
        assign, int(mdls[-1]["n_particles"]), mdls[-1], settings["self_evidence_correction"]
    )
    make_all_plots(
        mdls, maps, a, out_dir, pixel_size=float(mdls[-1]["pixel_size"]), config=dict(settings)
    )
    for k, dest in enumerate(class_orientations):
        src = Path(out_dir) / f"orientations_class_{k + 1:03d}.png"
        with atomic_path(dest, suffix=".png") as tmp:
            shutil.copyfile(src, tmp)
