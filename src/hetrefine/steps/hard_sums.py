"""Step of rule `hard_sums`: backproject each particle of one shard into its
hard-assigned class only (both half-sets together) at its best pose, for the
hard-assignment maps."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from hetrefine.backend import select_device
from hetrefine.backprojection import SumsGrid, hard_class_sums
from hetrefine.classification import fit_score_flags, half_b_order, relabel_half_b
from hetrefine.ctf import compute_ctf
from hetrefine.fourier import rfft2_centered
from hetrefine.io import run_files
from hetrefine.junk import centred_assignments
from hetrefine.rotations import euler_to_matrix


def hard_sums(
    chunks: list[str],
    assign: str,
    model: str,
    out_sums: str,
    settings: Mapping,
    device: str = "auto",
) -> None:
    """Sums (K, n_packed) of one shard's particles in their hard class, at full radius
    (particles flagged as junk by ``junk_fit_score`` left out); the shard's chunks read
    one at a time (memory follows a chunk, not the shard). ``model``: the last
    iteration's ``model.json`` (pixel size, and the permutation of half B's classes that
    reconstruct matched to half A's, ``classification.relabel_half_b``)."""
    xp = select_device(device)
    mdl = run_files.read_model(model)
    a = relabel_half_b(run_files.read_assignments(assign), half_b_order(mdl))
    a = centred_assignments(a, mdl)  # each class's fit scores about its own median
    row_of = {int(i): j for j, i in enumerate(a["index"].tolist())}
    px = float(mdl["pixel_size"])
    k_classes = a["posterior"].shape[1]
    total = run_files.SumsTotal()
    for chunk in chunks:
        sh = run_files.read_shard(chunk)
        here = np.array([int(i) in row_of for i in sh["index"].tolist()], bool)  # assigned
        mine = np.array([row_of[int(i)] for i in sh["index"][here]], dtype=np.int64)
        box = sh["images"].shape[-1]
        grid = SumsGrid.create(box, box / 2 - 1, xp, full_grid=True)
        num = np.zeros((k_classes, grid.n_packed), np.complex64)
        wgt = np.zeros((k_classes, grid.n_packed), np.float32)
        freq = 1.0 / (box * px)
        y = rfft2_centered(xp.asarray(sh["images"][here])).reshape(len(mine), -1)[:, grid.flat]
        c = compute_ctf(xp.asarray(sh["ctf"][here]), grid.kx * freq, grid.ky * freq)
        cls = a["posterior"][mine].argmax(1)
        if "fit_score" in a:
            flags = fit_score_flags(a["fit_score"][mine], settings["junk_fit_score"])
            cls = np.where(flags, -1, cls)
        for k in range(k_classes):
            use = np.flatnonzero(cls == k)
            if len(use) == 0:
                continue
            r = xp.asarray(euler_to_matrix(a["euler"][mine[use], k]).astype(np.float32))
            t = xp.asarray(-a["shift"][mine[use], k] / px)
            ux = xp.asarray(use)
            num[k], wgt[k] = hard_class_sums(y[ux], c[ux], r, t, grid)
        total.add(num, wgt, grid.size, chunk)
    total.write(out_sums)
