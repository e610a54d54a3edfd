"""Step of rule `hard_sums`: backproject each particle of one shard into its
hard-assigned class only (both half-sets together) at its best pose, for the
hard-assignment maps."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from hetrefine.backend import select_device
from hetrefine.backprojection import SumsGrid, hard_class_sums
from hetrefine.classification import fit_score_flags
from hetrefine.ctf import compute_ctf
from hetrefine.fourier import rfft2_centered
from hetrefine.io import run_files
from hetrefine.rotations import euler_to_matrix


def hard_sums(
    shard: str, assign: str, info: str, out_sums: str, settings: Mapping, device: str = "auto"
) -> None:
    """Sums (K, n_packed) of shard ``shard``'s particles in their hard class, at full radius
    (particles flagged as junk by ``junk_fit_score`` left out)."""
    xp = select_device(device)
    sh = run_files.read_shard(shard)
    a = run_files.read_assignments(assign)
    order = {int(i): j for j, i in enumerate(sh["index"].tolist())}
    rows = np.array([order[int(i)] for i in a["index"]], dtype=np.int64)
    images, ctf = sh["images"][rows], sh["ctf"][rows]
    post = a["posterior"]
    k_classes = post.shape[1]
    box = images.shape[-1]
    px = float(run_files.read_info(info)["pixel_size"])
    grid = SumsGrid.create(box, box / 2 - 1, xp, full_grid=True)
    num = np.zeros((k_classes, grid.n_packed), np.complex64)
    wgt = np.zeros((k_classes, grid.n_packed), np.float32)
    freq = 1.0 / (box * px)
    y = rfft2_centered(xp.asarray(images)).reshape(len(rows), -1)[:, grid.flat]
    c = compute_ctf(xp.asarray(ctf), grid.kx * freq, grid.ky * freq)
    cls = post.argmax(1)
    if "fit_score" in a:
        cls = np.where(fit_score_flags(a["fit_score"], settings["junk_fit_score"]), -1, cls)
    for k in range(k_classes):
        use = np.flatnonzero(cls == k)
        if len(use) == 0:
            continue
        r = xp.asarray(euler_to_matrix(a["euler"][use, k]).astype(np.float32))
        t = xp.asarray(-a["shift"][use, k] / px)
        ux = xp.asarray(use)
        num[k], wgt[k] = hard_class_sums(y[ux], c[ux], r, t, grid)
    run_files.write_sums(out_sums, num, wgt, grid.size)
