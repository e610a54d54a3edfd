"""Symmetrising speed: the reconstruct step's work for one class under C1, T, O, I.

Prints, per box and point group, the CPU time (process time, one thread by default) of

- ``pair``: symmetrising one half-set's Friedel-complete sums (numerator complex128 and
  CTF^2 weight float64 cubes of the padded grid, as ``reconstruction.unpack_sums`` gives
  them) with two ``symmetrize_fourier`` calls (the reconstruct step until this issue) and
  with one ``symmetrize_fourier_sums`` call (the reconstruct step now);
- ``half_maps``: ``reconstruction.half_maps`` for one class (both half-sets: symmetrise,
  Wiener filter twice, masked FSC), i.e. a reconstruct step's work per class, with the
  two calls and with ``symmetrize_fourier_sums`` (``reconstruction.symmetrize_sums``);
- with ``--before``: the previous implementation (``map_coordinates`` per operator,
  kept below as the reference) on the same pair, for the boxes at most ``--before-max``.

The sums are random Friedel-symmetric data inside the ball that backprojection fills
(radius pad * box / 2 of the grid), so the timings match a real run's grid sizes.

    OMP_NUM_THREADS=1 python bench/symmetry_speed.py --boxes 48 128 --before
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if __name__ == "__main__":  # threads before numpy is imported
    _threads = "1"
    if "--threads" in sys.argv:
        _threads = sys.argv[sys.argv.index("--threads") + 1]
    for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_v, _threads)

import numpy as np  # noqa: E402


def _before(arr, mats):
    """The previous symmetrize_fourier: map_coordinates(order=1) per operator, z chunks."""
    import scipy.ndimage as ndi

    d0, d1, d2 = arr.shape
    origin = d0 // 2
    zz, yy, xx = (np.arange(n, dtype=np.float64) - origin for n in (d0, d1, d2))
    parts = [arr.real, arr.imag] if np.iscomplexobj(arr) else [arr]
    parts = [np.ascontiguousarray(p) for p in parts]
    out = np.zeros(arr.shape, dtype=arr.dtype)
    for z0 in range(0, d0, 16):
        Z, Y, X = np.meshgrid(zz[z0 : z0 + 16], yy, xx, indexing="ij")
        r = np.stack([X.ravel(), Y.ravel(), Z.ravel()])
        acc = None
        for g in mats:
            q = g.T @ r
            coords = np.stack([q[2], q[1], q[0]]) + origin
            vals = [ndi.map_coordinates(p, coords, order=1, mode="constant") for p in parts]
            v = vals[0] + 1j * vals[1] if len(vals) == 2 else vals[0]
            acc = v if acc is None else acc + v
        out[z0 : z0 + 16] = acc.reshape(Z.shape)
    return out


def _sums(box: int, pad: int, rng):
    """Friedel-complete random sums (num, wgt) on the padded grid of a box."""
    from hetrefine.projection import grid_half_size

    half = grid_half_size(box, pad)
    n = 2 * half + 1
    c = np.arange(n) - half
    z, y, x = np.meshgrid(c, c, c, indexing="ij", sparse=True)
    ball = x * x + y * y + z * z <= (pad * box / 2) ** 2
    num = np.where(ball, rng.standard_normal((n, n, n)) + 1j * rng.standard_normal((n, n, n)), 0)
    num = num + np.conj(num[::-1, ::-1, ::-1])
    wgt = np.where(ball, rng.random((n, n, n)), 0.0)
    wgt = wgt + wgt[::-1, ::-1, ::-1]
    return num, wgt


def _cpu(f):
    t = time.process_time()
    out = f()
    return time.process_time() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--boxes", type=int, nargs="+", default=[48, 128])
    ap.add_argument("--groups", nargs="+", default=["C1", "T", "O", "I"])
    ap.add_argument("--before", action="store_true", help="also time the previous implementation")
    ap.add_argument("--before-max", type=int, default=48, help="largest box timed --before")
    ap.add_argument("--threads", default="1")
    args = ap.parse_args()

    from hetrefine import reconstruction
    from hetrefine.mask import soft_sphere
    from hetrefine.projection import PAD
    from hetrefine.symmetrize import symmetrize_fourier, symmetrize_fourier_sums
    from hetrefine.symmetry import symmetry_matrices

    pad = PAD
    with_sums = reconstruction.symmetrize_sums

    def today(num, wgt, mats):  # the two calls of the reconstruct step before this issue
        if len(mats) > 1:
            return symmetrize_fourier(num, mats), symmetrize_fourier(wgt, mats)
        return num, wgt

    print(f"threads {args.threads}; CPU seconds (process time)")
    print(f"{'box':>4} {'grid':>5} {'group':>5} {'pair: 2x fourier':>17} {'pair: sums':>11} "
          f"{'half_maps today':>16} {'half_maps sums':>15} {'before (pair)':>14}")  # fmt: skip
    for box in args.boxes:
        rng = np.random.default_rng(0)
        num, wgt = _sums(box, pad, rng)
        num2, wgt2 = np.stack([num, num]), np.stack([wgt, wgt])
        mask = soft_sphere(box, 1.0, 0.8 * box, 0.9 * box)
        for group in args.groups:
            mats = symmetry_matrices(group)
            if len(mats) > 1:
                t_two, (a, _) = _cpu(
                    lambda: (symmetrize_fourier(num, mats), symmetrize_fourier(wgt, mats))  # noqa: B023
                )
                t_sums, (b, _) = _cpu(lambda: symmetrize_fourier_sums(num, wgt, mats))  # noqa: B023
                assert np.abs(a - b).max() <= 1e-9 * np.abs(a).max()
            else:
                t_two = t_sums = 0.0
            reconstruction.symmetrize_sums = today
            t_hm, _ = _cpu(lambda: reconstruction.half_maps(num2, wgt2, box, mats, mask, 1.0))  # noqa: B023
            reconstruction.symmetrize_sums = with_sums
            t_hm2, _ = _cpu(lambda: reconstruction.half_maps(num2, wgt2, box, mats, mask, 1.0))  # noqa: B023
            before = ""
            if args.before and box <= args.before_max and len(mats) > 1:
                t_b, c = _cpu(lambda: (_before(num, mats), _before(wgt, mats)))  # noqa: B023
                assert np.abs(c[0] - a).max() <= 1e-9 * np.abs(a).max()
                before = f"{t_b:.2f}"
            print(f"{box:>4} {num.shape[0]:>5} {group:>5} {t_two:>17.2f} {t_sums:>11.2f} "
                  f"{t_hm:>16.2f} {t_hm2:>15.2f} {before:>14}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
