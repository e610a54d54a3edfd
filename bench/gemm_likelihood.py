"""The likelihood step's effective GFLOP/s next to this machine's float32 matrix-multiply rate.

    python bench/gemm_likelihood.py                       # 1 thread, box 64 and 128
    python bench/gemm_likelihood.py --threads 2 --n 512
    python bench/gemm_likelihood.py --boxes 64 --json bench/out/gemm.json

1. GEMM rate: numpy float32 matrix products, (3000 x 400) @ (400 x 4000) (about
   the shape of the coarse search's cross GEMM) and 2048^3 square, best of
   ``--repeat`` runs; and the coarse cross GEMM at its exact shapes.
2. Simulated particles (``hetrefine.simulate``, K=2, SNR 0.05; box 64 at 4 A/px,
   box 128 at 2 A/px, i.e. the same particle) are preprocessed by the
   workflow's own step (``hetrefine.steps.preprocess``), then
   ``hetrefine.alignment.coarse_search`` and the whole
   ``hetrefine.alignment.search_poses`` are timed with the defaults of
   ``hetrefine.config.defaults()`` and ``res_limit_px = box / 4``.
   The CPU kernels are the compiled ones when Numba is installed (``hetrefine.kernels``);
   ``HETREFINE_KERNELS=numpy`` times the numpy reference path.
3. FLOPs are counted from what the code does (multiply-add = 2 FLOPs):
   coarse, per class: cross GEMM 2 (n S)(2 m_c) R + norm GEMM 2 n m_c R;
   local level l (C_1 = n_candidates, later C_l = 1), per class:
   cross (batched 9 x 2m by 2m x P) 2 n C_l 9 P (2 m_l) + norm 2 n C_l P m_l, with P =
   settings.local_points rotations per local step.
   Projections (trilinear gathers), phase factors, exp/max/argmax are not
   counted: they are the overhead that keeps the step below the GEMM rate.
   The time inside reference-slice interpolation (``projection.project``) is
   also measured on its own, so the table shows the search's rate with and
   without it.

Threads are set with OMP/OPENBLAS/MKL_NUM_THREADS before numpy is imported
(threadpoolctl, when installed, is asked what took effect). With CuPy and a GPU
present the same search runs on the GPU too (``--gpu``); otherwise it says so.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads")
    ap.add_argument("--boxes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--n", type=int, default=256, help="particles timed per box")
    ap.add_argument("--classes", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5, help="repeats of each GEMM (best taken)")
    ap.add_argument(
        "--gpu", choices=["auto", "no"], default="auto", help="also run on CuPy when present"
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument(
        "--kernels",
        nargs="+",
        choices=["auto", "numba", "numpy"],
        default=["auto"],
        help="CPU kernel paths to time, one after the other per box (HETREFINE_KERNELS)",
    )
    ap.add_argument("--search-repeat", type=int, default=1, help="repeats of each CPU search")
    return ap.parse_args()


ARGS = parse()
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = str(ARGS.threads)

import numpy as np  # noqa: E402  (after the thread settings)


def blas_info() -> str:
    """What BLAS numpy uses and with how many threads."""
    try:
        from threadpoolctl import threadpool_info

        return "; ".join(
            f"{i.get('internal_api')} {i.get('version')} {i.get('architecture', '')} threads={i.get('num_threads')}"
            for i in threadpool_info()
        )
    except ImportError:
        cfg = np.show_config(mode="dicts")
        blas = cfg.get("Build Dependencies", {}).get("blas", {})
        simd = cfg.get("SIMD Extensions", {})
        return (
            f"{blas.get('name')} {blas.get('version')} ({blas.get('openblas configuration', '')}); "
            f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')}, "
            f"OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']} (threadpoolctl not installed); "
            f"numpy SIMD found: {','.join(simd.get('found', []))}"
        )


def gemm_rate(m: int, k: int, n: int, repeat: int, xp=np) -> tuple[float, float]:
    """Best GFLOP/s of a float32 (m x k) @ (k x n) product: per wall second and per CPU
    second of this process (divided by the thread count: the rate of one busy core
    times the threads, i.e. what the run would reach on an idle machine)."""
    rng = np.random.default_rng(0)
    a = xp.asarray(rng.standard_normal((m, k), dtype=np.float32))
    b = xp.asarray(rng.standard_normal((k, n), dtype=np.float32))
    c = a @ b
    sync(xp)
    wall, cpu = best_of(lambda: a @ b, repeat, xp)
    del c
    f = 2.0 * m * k * n / 1e9
    return f / wall, f / cpu


def best_of(fn, repeat: int, xp=np) -> tuple[float, float]:
    """Best wall seconds and best CPU seconds per thread (process CPU time / threads;
    wall time on a GPU) of ``repeat`` calls of ``fn``."""
    wall = cpu = np.inf
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync(xp)
        w, c = time.perf_counter() - t0, time.process_time() - c0
        wall = min(wall, w)
        cpu = min(cpu, w if xp is not np else c / ARGS.threads)
    return wall, cpu


def sync(xp) -> None:
    if xp is not np:
        xp.cuda.Stream.null.synchronize()


def make_particles(box: int, n: int, k: int, workdir: Path):
    """Simulate and preprocess ``n`` particles; returns (images, ctf, volumes, pixel size)."""
    from hetrefine.config import defaults
    from hetrefine.io.mrc import read_volume
    from hetrefine.plan import n_chunks
    from hetrefine.simulate import SimulationSpec, simulate_dataset
    from hetrefine.steps import settings_for
    from hetrefine.steps.preprocess import preprocess

    px = 4.0 * 64 / box
    spec = SimulationSpec(n_particles=n, n_classes=k, box=box, pixel_size=px, snr=0.05, seed=1)
    data = workdir / f"sim_{box}"
    simulate_dataset(spec, data)
    cfg = defaults()
    cfg["shard_size"] = n
    pre = workdir / f"pre_{box}"
    preprocess(
        str(data / "particles.star"), str(pre / "info.json"), str(pre / "metadata.npz"), str(pre / "sample.npz"),
        [str(pre / f"chunk_{c:05d}.npz") for c in range(n_chunks(n, n))], settings_for("preprocess", cfg),
    )  # fmt: skip
    chunks = [np.load(p) for p in sorted(pre.glob("chunk_*.npz"))]  # preprocess writes chunks
    images = np.concatenate([f["images"] for f in chunks])
    ctf = np.concatenate([f["ctf"] for f in chunks])
    vols = [read_volume(data / f"truth_class_{i + 1:02d}.mrc")[0] for i in range(k)]
    return images, ctf, vols, px


def count_flops(settings, n: int, k: int, n_rot: int) -> dict:
    """GEMM FLOPs of coarse_search and of each local level, as the code runs them."""
    from hetrefine.fourier import half_plane_indices
    from hetrefine.sampling import shift_grid

    s = len(shift_grid(settings.shift_range_px, settings.shift_step_px))
    m_c = len(
        half_plane_indices(settings.box, settings.radius_for_step(settings.coarse_step_deg))[0]
    )
    coarse_cross = k * 2.0 * (n * s) * (2 * m_c) * n_rot
    coarse_norm = k * 2.0 * n * m_c * n_rot
    local = []
    for level in range(1, settings.levels + 1):
        c = min(settings.n_candidates, n_rot) if level == 1 else 1
        m_l = len(
            half_plane_indices(
                settings.box, settings.radius_for_step(settings.coarse_step_deg / 2**level)
            )[0]
        )
        local.append(
            {
                "level": level,
                "m": m_l,
                "candidates": c,
                "cross": k * 2.0 * n * c * 9 * settings.local_points * 2 * m_l,
                "norm": k * 2.0 * n * c * settings.local_points * m_l,
            }
        )
    return {
        "shifts": s,
        "rotations": n_rot,
        "m_coarse": m_c,
        "coarse_cross": coarse_cross,
        "coarse_norm": coarse_norm,
        "coarse": coarse_cross + coarse_norm,
        "local": local,
        "total": coarse_cross + coarse_norm + sum(lv["cross"] + lv["norm"] for lv in local),
    }


def time_search(images, ctf, vols, px: float, xp, repeat: int = 1) -> dict:
    """Time coarse_search and search_poses (and the coarse cross GEMM at its shapes) on ``xp``."""
    from hetrefine.alignment import SearchSettings, coarse_search, search_poses
    from hetrefine.config import defaults
    from hetrefine.fourier import radial_shells, rfft2_centered, shell_average
    from hetrefine.mask import soft_sphere
    from hetrefine.projection import prepare_reference
    from hetrefine.sampling import rotation_grid, shift_grid

    cfg = defaults()
    box = images.shape[-1]
    n, k = len(images), len(vols)
    settings = SearchSettings(
        box=box,
        pixel_size=px,
        res_limit_px=box / 4,
        coarse_step_deg=float(cfg["coarse_angle_step_deg"]),
        levels=int(cfg["local_refine_levels"]),
        shift_range_px=float(cfg["shift_range_px"]),
        shift_step_px=float(cfg["shift_step_px"]),
        per_particle_scale=bool(cfg["per_particle_scale"]),
    )
    rots = rotation_grid(float(cfg["coarse_angle_step_deg"]), cfg["symmetry"]).astype(np.float32)
    mask = soft_sphere(box, px, 0.75 * box * px, 0.9 * box * px)
    spec_h = rfft2_centered(images)
    p = (np.abs(spec_h) ** 2).mean(axis=0)
    sigma2 = shell_average(p, radial_shells(box), box // 2 + 1).astype(np.float32)
    sigma2 = np.maximum(sigma2, 1e-3 * sigma2[1:].mean())
    spectra = xp.asarray(spec_h.astype(np.complex64))
    ctf_x = xp.asarray(ctf)
    s2 = xp.asarray(sigma2)
    grids = [prepare_reference(xp.asarray(v * mask), settings.pad) for v in vols]
    rots_x = xp.asarray(rots)
    flops = count_flops(settings, n, k, len(rots))

    # warm-up: BLAS buffers, and the compiled kernels loaded from Numba's cache (or
    # compiled: the cold start is bench/kernel_speed.py's to measure)
    search_poses(spectra[:8], ctf_x[:8], s2, grids, rots, settings)
    sync(xp)
    t_coarse, c_coarse = best_of(
        lambda: coarse_search(spectra, ctf_x, s2, grids, rots_x, settings), repeat, xp
    )
    t_all, c_all = best_of(
        lambda: search_poses(spectra, ctf_x, s2, grids, rots, settings), repeat, xp
    )

    # CPU time inside reference-slice interpolation (projection.project) during one
    # whole search: the part of the search that is not likelihood arithmetic
    t_proj = projection_seconds(lambda: search_poses(spectra, ctf_x, s2, grids, rots, settings), xp)

    # the coarse cross GEMM alone at the code's shapes: (b S, 2 m) @ (2 m, R), n/b batches per class
    m_c = flops["m_coarse"]
    b = settings.batch_size
    s = len(shift_grid(settings.shift_range_px, settings.shift_step_px))
    rng = np.random.default_rng(0)
    x = xp.asarray(rng.standard_normal((b * s, 2 * m_c), dtype=np.float32))
    a = xp.asarray(rng.standard_normal((2 * m_c, len(rots)), dtype=np.float32))
    c = x @ a
    sync(xp)
    del c
    _, t_g = best_of(lambda: x @ a, 5, xp)
    shape_rate = 2.0 * b * s * 2 * m_c * len(rots) / t_g / 1e9
    return {
        "box": box,
        "pixel_size": px,
        "n": n,
        "classes": k,
        "res_limit_px": box / 4,
        "flops": flops,
        "t_coarse_s": t_coarse,
        "t_search_s": t_all,
        "cpu_coarse_s": c_coarse,
        "cpu_search_s": c_all,
        "coarse_gflops": flops["coarse"] / c_coarse / 1e9,
        "search_gflops": flops["total"] / c_all / 1e9,
        "cpu_projection_s": t_proj,
        "search_wo_projection_gflops": flops["total"] / max(c_all - t_proj, 1e-9) / 1e9,
        "coarse_gflops_wall": flops["coarse"] / t_coarse / 1e9,
        "search_gflops_wall": flops["total"] / t_all / 1e9,
        "coarse_shape_gemm_gflops": shape_rate,
        "coarse_gemm_share_of_time": flops["coarse_cross"] / (shape_rate * 1e9) / c_coarse,
        "ms_per_particle_class": 1e3 * c_all / (n * k),
        "ms_per_particle_class_wall": 1e3 * t_all / (n * k),
    }


def projection_seconds(fn, xp) -> float:
    """CPU seconds per thread (GPU: wall) spent in ``alignment.project`` and
    ``alignment.slice_scores`` (the local search's gathers with, since the compiled
    kernels, its inner products fused in) while ``fn`` runs."""
    import hetrefine.alignment as alignment

    spent = [0.0]

    def timed(real):
        def wrapper(*a, **k):
            sync(xp)
            t0 = time.perf_counter() if xp is not np else time.process_time()
            out = real(*a, **k)
            sync(xp)
            dt = time.perf_counter() - t0 if xp is not np else time.process_time() - t0
            spent[0] += dt / (1 if xp is not np else ARGS.threads)
            return out

        return wrapper

    names = [n for n in ("project", "slice_scores") if hasattr(alignment, n)]
    real = {n: getattr(alignment, n) for n in names}
    for n in names:
        setattr(alignment, n, timed(real[n]))
    try:
        fn()
    finally:
        for n in names:
            setattr(alignment, n, real[n])
    return spent[0]


def report(backend: str, rates: dict, rows: list[dict]) -> None:
    peak = max(v[1] for v in rates.values())
    print(
        f"\n[{backend}] float32 GEMM, GFLOP/s per CPU second (per wall second): "
        + ", ".join(f"{k} {v[1]:.1f} ({v[0]:.1f})" for k, v in rates.items())
    )
    head = (
        f"{'box':>4} {'n':>5} {'K':>2} {'R':>5} {'S':>3} {'m_c':>4} {'m_l':>10} "
        f"{'coarse s':>9} {'GFLOP/s':>8} {'of peak':>7} {'search s':>9} {'GFLOP/s':>8} {'of peak':>7} "
        f"{'GEMM@shape':>10} {'ms/ptcl/cls':>11} {'proj s':>7} {'w/o proj':>8} kernels"
    )
    print(head)
    for r in rows:
        f = r["flops"]
        ml = "/".join(str(lv["m"]) for lv in f["local"])
        print(
            f"{r['box']:>4} {r['n']:>5} {r['classes']:>2} {f['rotations']:>5} {f['shifts']:>3} {f['m_coarse']:>4} {ml:>10} "
            f"{r['cpu_coarse_s']:>9.2f} {r['coarse_gflops']:>8.1f} {r['coarse_gflops'] / peak:>7.0%} "
            f"{r['cpu_search_s']:>9.2f} {r['search_gflops']:>8.1f} {r['search_gflops'] / peak:>7.0%} "
            f"{r['coarse_shape_gemm_gflops']:>10.1f} {r['ms_per_particle_class']:>11.2f} "
            f"{r['cpu_projection_s']:>7.2f} {r['search_wo_projection_gflops'] / peak:>8.0%} "
            f"{r.get('kernels', 'auto')}"
        )
    for r in rows:
        f = r["flops"]
        loc = ", ".join(
            f"level {lv['level']}: {(lv['cross'] + lv['norm']) / 1e9:.2f}" for lv in f["local"]
        )
        print(
            f"box {r['box']}: GFLOP coarse {f['coarse'] / 1e9:.2f} (cross {f['coarse_cross'] / 1e9:.2f}), {loc}; "
            f"the coarse cross GEMM alone at its shapes would take {100 * r['coarse_gemm_share_of_time']:.0f}% "
            f"of the measured coarse time"
        )
    print(
        "times are CPU seconds per thread (process CPU time / threads; GPU: wall), best of the repeats; "
        "of peak = effective GFLOP/s (counted GEMM FLOPs / time) over the best float32 GEMM rate; "
        "GEMM@shape = the coarse cross GEMM alone at (64 S, 2 m_c) x (2 m_c, R); proj s = time in reference-slice "
        "interpolation within one search (projection.project and projection.slice_scores: the local search's gathers, "
        "and its inner products where the compiled kernel fuses them); w/o proj = the search's GFLOP/s without it, "
        "over the peak. Wall seconds: "
        + ", ".join(
            f"box {r['box']} coarse {r['t_coarse_s']:.2f} search {r['t_search_s']:.2f}"
            for r in rows
        )
    )


def main() -> None:
    from hetrefine import kernels

    print(
        f"threads {ARGS.threads}; {os.cpu_count()} CPUs visible; load {os.getloadavg()[0]:.1f}; "
        f"numpy {np.__version__}; BLAS: {blas_info()}; CPU kernels: "
        + (
            "numba " + kernels.compiled().numba.__version__
            if kernels.use_numba(np)
            else "numpy reference path"
        )
    )
    out = {"threads": ARGS.threads, "date": time.strftime("%Y-%m-%d %H:%M"), "cpu": {}, "gpu": None}
    rates = {
        "3000x400x4000": gemm_rate(3000, 400, 4000, ARGS.repeat),
        "2048^3": gemm_rate(2048, 2048, 2048, ARGS.repeat),
    }
    out["cpu"]["gemm_gflops"] = rates
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = {}
        for box in ARGS.boxes:
            data[box] = make_particles(box, ARGS.n, ARGS.classes, Path(tmp))
            for choice in ARGS.kernels:
                os.environ["HETREFINE_KERNELS"] = choice
                rows.append(time_search(*data[box], np, repeat=ARGS.search_repeat))
                rows[-1]["kernels"] = choice
            print(f"box {box}: done ({rows[-1]['t_search_s']:.1f} s wall per search)", flush=True)
        rates["3000x400x4000 (again)"] = gemm_rate(3000, 400, 4000, ARGS.repeat)
        report("CPU numpy", rates, rows)
        out["cpu"]["search"] = rows
        from hetrefine.backend import cupy_available

        if ARGS.gpu == "auto" and cupy_available():
            import cupy as cp

            g_rates = {
                "3000x400x4000": gemm_rate(3000, 400, 4000, ARGS.repeat, cp),
                "8192^3": gemm_rate(8192, 8192, 8192, ARGS.repeat, cp),
            }
            g_rows = [time_search(*data[box], cp, repeat=2) for box in ARGS.boxes]
            report(
                f"GPU CuPy {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}",
                g_rates,
                g_rows,
            )
            out["gpu"] = {"gemm_gflops": g_rates, "search": g_rows}
        else:
            print("\nGPU: skipped (CuPy with a visible GPU not present on this machine)")
    if ARGS.json:
        ARGS.json.parent.mkdir(parents=True, exist_ok=True)
        ARGS.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    sys.exit(main())
