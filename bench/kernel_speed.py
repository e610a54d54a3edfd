"""The compiled CPU kernels (``hetrefine.kernels``, Numba) against the numpy reference
path, one kernel at a time, and Numba's start-up cost in a fresh process.

    OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python bench/kernel_speed.py
    python bench/kernel_speed.py --box 64 --n 250

1. Gathers: ``projection.project`` of a box-``--box`` reference (padded 2x, the whole
   Nyquist cube as the align step prepares it) at the local search's rotations (19
   perturbations of random candidates at 3.75 deg) and radius ``box/4``.
2. Local scores: ``projection.slice_scores`` (the gathers plus the 9-shift cross and
   the norm inner products) for 32 particles x 2 candidates x 19 rotations.
3. Scatter: ``backprojection.marginalised_class_sums`` of ``--n`` particles with 4
   significant poses each (2 rotations x 2 shifts), backprojection radius for the
   limit ``box/4``: one class and half-set of an align job.
4. Cold start: a fresh Python process imports hetrefine and runs each kernel once
   on tiny inputs, with an empty Numba cache (compiles) and again with the cache
   it left (loads), against the numpy path.

CPU seconds of this process (best of ``--repeat``); ns per interpolated point.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import numpy as np  # noqa: E402

COLD = """
import time, numpy as np
t0 = time.process_time()
from hetrefine.backprojection import SumsGrid, marginalised_class_sums
from hetrefine.projection import prepare_reference, project, slice_scores
t1 = time.process_time()
g = prepare_reference(np.ones((16, 16, 16), np.float32), 2)
kx = ky = np.zeros(4, np.float32)
r = np.eye(3)[None, None, None].repeat(2, 2)
project(g, r[0, 0].astype(np.float32), kx, ky)
slice_scores(g, r, kx, ky, np.ones((1, 1, 9, 4), np.complex64), np.ones((1, 4), np.float32))
sg = SumsGrid.create(16, 5.0)
m = len(sg.kx)
marginalised_class_sums(np.ones((1, m), np.complex64), np.ones((1, m), np.float32), sg,
    np.ones(1), np.ones(1), np.ones(m, np.float32), r[0, 0][None], np.zeros((1, 2, 2), np.float32),
    np.array([[0.5, 0.5]]))
print(f"{t1 - t0:.3f} {time.process_time() - t1:.3f}")
"""


def cold_start() -> dict:
    """(import s, first calls s) CPU seconds in fresh processes."""
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for label, extra in (
            ("numpy path", {"HETREFINE_KERNELS": "numpy"}),
            ("numba, empty cache", {}),
            ("numba, cache filled", {}),
        ):
            r = subprocess.run(
                [sys.executable, "-c", COLD], env={**env, **extra}, capture_output=True, text=True
            )
            if r.returncode:
                raise RuntimeError(r.stderr)
            out[label] = tuple(float(v) for v in r.stdout.split())
    return out


def best_cpu(fn, repeat: int) -> float:
    best = np.inf
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--box", type=int, default=128)
    ap.add_argument("--n", type=int, default=250, help="particles backprojected")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    from hetrefine import kernels
    from hetrefine.backprojection import SumsGrid, backprojection_radius, marginalised_class_sums
    from hetrefine.fourier import half_plane_indices
    from hetrefine.projection import prepare_reference, project, slice_scores
    from hetrefine.rotations import random_rotations
    from hetrefine.sampling import perturbations

    box, res = args.box, args.box / 4
    rng = np.random.default_rng(0)
    g = np.arange(box) - box // 2
    z, y, x = np.meshgrid(g, g, g, indexing="ij", sparse=True)
    vol = np.exp(-(x * x + y * y + z * z) / (2 * (box / 8) ** 2)).astype(np.float32)
    vol += 0.1 * rng.standard_normal(vol.shape).astype(np.float32)
    grid = prepare_reference(vol, 2)
    _, kx, ky = half_plane_indices(box, res, np)
    m = len(kx)
    nb, n_c = 32, 2
    cand = np.matmul(
        perturbations(3.75, 19)[None, None],
        random_rotations(nb * n_c, rng).reshape(nb, n_c, 1, 3, 3),
    )
    xs = (rng.standard_normal((nb, n_c, 9, m)) + 1j * rng.standard_normal((nb, n_c, 9, m))).astype(
        np.complex64
    )
    c2w = rng.uniform(0, 1, (nb, m)).astype(np.float32)
    pts = cand.shape[0] * n_c * 19 * m

    sg = SumsGrid.create(box, backprojection_radius(res, box))
    n, ms = args.n, len(sg.kx)
    y_p = (rng.standard_normal((n, ms)) + 1j * rng.standard_normal((n, ms))).astype(np.complex64)
    ctf = rng.uniform(-1, 1, (n, ms)).astype(np.float32)
    r2 = random_rotations(2 * n, rng).reshape(n, 2, 1, 3, 3).repeat(2, axis=2).reshape(n, 4, 3, 3)
    sh = rng.uniform(-2, 2, (n, 4, 2)).astype(np.float32)
    sw = rng.dirichlet(np.ones(4), n)
    inv_s2 = np.ones(ms, np.float32)

    rows = []
    for label, fn, npts in (
        ("project (local-search slices)", lambda: project(grid, cand.reshape(-1, 3, 3), kx, ky), pts),
        ("slice_scores (gathers + 9-shift cross + norm)", lambda: slice_scores(grid, cand, kx, ky, xs, c2w), pts),
        (
            f"marginalised_class_sums ({n} particles x 4 poses)",
            lambda: marginalised_class_sums(y_p, ctf, sg, np.ones(n), np.ones(n), inv_s2, r2, sh, sw),
            2 * n * ms,
        ),
    ):  # fmt: skip
        t = {}
        for k in ("numpy", "numba"):
            os.environ[kernels.ENV_VAR] = k
            fn()  # warm-up (compiles or loads the kernel)
            t[k] = best_cpu(fn, args.repeat)
        rows.append((label, t["numpy"], t["numba"], npts))
    os.environ.pop(kernels.ENV_VAR)

    print(
        f"box {box}, radius {res:.0f} px, grid {grid.shape[0]}^3 complex64 "
        f"({grid.nbytes / 2**20:.0f} MiB), m = {m}; sums grid {sg.size}^3, {ms} points; "
        f"load {os.getloadavg()[0]:.1f}; numba {kernels.compiled().numba.__version__}"
    )
    print(
        f"{'kernel':<52} {'numpy s':>8} {'numba s':>8} {'speed-up':>8} {'ns/pt numpy':>11} {'numba':>6}"
    )
    for label, a, b, npts in rows:
        print(
            f"{label:<52} {a:>8.3f} {b:>8.3f} {a / b:>7.1f}x {1e9 * a / npts:>11.1f} {1e9 * b / npts:>6.1f}"
        )
    print(
        "\ncold start, CPU s in a fresh process (import hetrefine's kernels modules / first calls):"
    )
    for label, (imp, first) in cold_start().items():
        print(f"  {label:<22} import {imp:.2f}  first calls {first:.2f}")


if __name__ == "__main__":
    main()
