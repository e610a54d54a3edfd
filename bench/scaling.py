"""How time and memory grow with particles, classes, box and shards (align and reconstruct steps).

    python bench/scaling.py                                   # K 2 4 6, box 64 128, shard 500, 1 thread
    python bench/scaling.py --classes 2 --boxes 64 --shard-sizes 250 500 1000
    python bench/scaling.py --particles 1000 10000 100000 500000 --workers 1 2 8 32

What is measured, per (box, K, shard size): one align job (``hetrefine.steps.align_chunks``,
the workflow's align step) on one shard of simulated particles (SNR 0.05, box
64 at 4 A/px, box 128 at 2 A/px), in a full-EM iteration at the highest
resolution limit of the box (``res_limit_px = box/2 - 1``: the most expensive
iteration of a run), and one reconstruct job (``hetrefine.steps.reconstruct``)
on that shard's sums; each as a child process (``os.wait4``: wall, CPU = user +
sys, peak RSS), with OMP/OPENBLAS threads = ``--threads``.

What is extrapolated (marked "extrapolated" in the table): the time of one
iteration for N particles, n_shards = ceil(N / shard) align jobs run W at a
time: ceil(n_shards / W) x t_align + t_reconstruct (reconstruct's own time
grows by reading n_shards sum files, not counted: the table shows the bytes of
per-shard sums written and read per iteration, n_shards x the measured file
size, which at box 128 is the real limit), and the CPU hours of a
whole run of ``--iterations`` iterations, all counted at the highest-resolution
cost (an upper bound: early iterations run at low resolution and, with online
EM, on a batch of particles). Memory per job is the measured one: it depends
on box, K and shard size, not on N (see bench/memory_scaling.py for the
measured check through Snakemake).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "scaling"


def child(job: dict, threads: int, log: Path) -> dict:
    """Run one step (``job``) in a child process; wall, CPU, peak RSS (MiB)."""
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        OPENBLAS_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
    )
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    t0 = time.perf_counter()
    with open(log, "ab") as fh:
        p = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"step failed: {job['step']}; see {log}")
    return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "max_rss_mib": ru.ru_maxrss / 1024}


def worker(job: dict) -> None:
    """Child side: run one step with the arguments in ``job``."""
    import logging

    from hetrefine.steps import settings_for
    from hetrefine.steps.align import align_chunks
    from hetrefine.steps.reconstruct import reconstruct

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if job["step"] == "align":
        align_chunks(*job["args"], settings_for("align", job["config"]), job["config"]["device"])
    elif job["step"] == "reconstruct":
        reconstruct(*job["args"], settings_for("reconstruct", job["config"]))
    else:
        raise ValueError(job["step"])


def setup(box: int, k: int, shard: int, seed: int) -> tuple[Path, dict]:
    """Simulate one shard of particles, preprocess, mask, init; set the resolution limit
    to the box's highest. Returns the folder and the config."""
    from hetrefine.config import defaults
    from hetrefine.pipeline import prepare_run
    from hetrefine.simulate import SimulationSpec, simulate_dataset

    d = OUT / f"box{box}_k{k}_shard{shard}"
    cfg = defaults()
    cfg.update(shard_size=shard, online_em_iterations=0, seed=seed, device="cpu")
    if (d / "iter_000" / "model.json").exists():
        return d, cfg
    px = 4.0 * 64 / box
    spec = SimulationSpec(
        n_particles=shard, n_classes=k, box=box, pixel_size=px, snr=0.05, seed=seed
    )
    simulate_dataset(spec, d / "data")
    models = [str(d / "data" / f"initial_model_{i + 1:02d}.mrc") for i in range(k)]
    prepare_run(str(d / "data" / "particles.star"), models, str(d), cfg)
    mdl = json.loads((d / "iter_000" / "model.json").read_text())
    mdl["res_limit_px"] = box / 2 - 1
    mdl["res_limit_A"] = box * px / mdl["res_limit_px"]
    (d / "iter_000" / "model.json").write_text(json.dumps(mdl))
    return d, cfg


def measure(box: int, k: int, shard: int, threads: int, seed: int) -> dict:
    cache = OUT / f"box{box}_k{k}_shard{shard}_t{threads}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    d, cfg = setup(box, k, shard, seed)
    it = d / "iter_001"
    (it / "align").mkdir(parents=True, exist_ok=True)
    log = d / "steps.log"
    # the shard's preprocessed chunks (sets cached before chunks existed: one shard file)
    pre = d / "preprocess"
    chunks = [str(p) for p in sorted(pre.glob("chunk_*.npz")) or sorted(pre.glob("shard_*.npz"))]
    a = child(
        {
            "step": "align",
            "args": [chunks, str(d / "iter_000" / "references.npz"),
                     str(d / "iter_000" / "model.json"), str(d / "mask.mrc"), str(d / "mask_focus.mrc"), [], 1,
                     str(it / "align" / "shard_0000.npz"), str(it / "align" / "shard_0000.sums.npz")],
            "config": cfg,
        },
        threads, log,
    )  # fmt: skip
    r = child(
        {
            "step": "reconstruct",
            "args": [[str(it / "align" / "shard_0000.npz")], [str(it / "align" / "shard_0000.sums.npz")],
                     str(d / "iter_000" / "model.json"), str(d / "iter_000" / "references.npz"), [],
                     str(d / "mask.mrc"), 1,
                     str(it / "references.npz"), str(it / "model.json")],
            "config": cfg,
        },
        threads, log,
    )  # fmt: skip
    sums = it / "align" / "shard_0000.sums.npz"
    res = {"box": box, "k": k, "shard": shard, "threads": threads, "align": a, "reconstruct": r,
           "sums_bytes": sums.stat().st_size}  # fmt: skip
    sums.unlink()  # large at box 128 (K x 2 padded Fourier grids); size kept in the json
    cache.write_text(json.dumps(res, indent=1))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--boxes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--classes", type=int, nargs="+", default=[2, 4, 6])
    ap.add_argument("--shard-sizes", type=int, nargs="+", default=[500])
    ap.add_argument(
        "--particles",
        type=int,
        nargs="+",
        default=[1000, 10000, 100000],
        help="N to extrapolate to",
    )
    ap.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2], help="align jobs at once (extrapolated)"
    )
    ap.add_argument(
        "--iterations", type=int, default=8, help="iterations of a whole run (extrapolated)"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(json.loads(a.worker))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    for box in a.boxes:
        for k in a.classes:
            for shard in a.shard_sizes:
                print(f"measuring box {box}, K {k}, shard {shard} ...", flush=True)
                rows.append(measure(box, k, shard, a.threads, a.seed))
    print(
        f"\nMEASURED (one job each, {a.threads} thread(s); CPU = user+sys s; RSS = peak MiB; "
        f"full EM at res_limit box/2-1; load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)"
    )
    print(
        f"{'box':>4} {'K':>2} {'shard':>5} | {'align wall':>10} {'CPU':>7} {'ms CPU/ptcl/cls':>15} {'RSS':>6} "
        f"| {'recon wall':>10} {'CPU':>6} {'RSS':>6}"
    )
    for r in rows:
        al, rc = r["align"], r["reconstruct"]
        print(
            f"{r['box']:>4} {r['k']:>2} {r['shard']:>5} | {al['wall_s']:>10.1f} {al['cpu_s']:>7.1f} "
            f"{1e3 * al['cpu_s'] / (r['shard'] * r['k']):>15.2f} {al['max_rss_mib']:>6.0f} "
            f"| {rc['wall_s']:>10.1f} {rc['cpu_s']:>6.1f} {rc['max_rss_mib']:>6.0f}"
        )
    print(
        f"\nEXTRAPOLATED from the CPU times above: one iteration = ceil(ceil(N/shard)/W) x t_align + t_reconstruct "
        f"(W align jobs at once, each at the measured per-job CPU time); whole run = {a.iterations} such iterations "
        f"(upper bound); memory per job = measured, independent of N"
    )
    head = (
        f"{'box':>4} {'K':>2} {'shard':>5} {'N':>7} {'shards':>6} "
        + "".join(f"{'iter h W=' + str(w):>12}" for w in a.workers)
        + f" {'run CPU h':>10} {'sums GB/iter':>12}"
    )
    print(head)
    for r in rows:
        for n in a.particles:
            n_sh = math.ceil(n / r["shard"])
            t_a, t_r = r["align"]["cpu_s"], r["reconstruct"]["cpu_s"]
            cells = "".join(f"{(math.ceil(n_sh / w) * t_a + t_r) / 3600:>12.3f}" for w in a.workers)
            total = a.iterations * (n_sh * t_a + t_r) / 3600
            gb = n_sh * r.get("sums_bytes", float("nan")) / 1e9
            print(
                f"{r['box']:>4} {r['k']:>2} {r['shard']:>5} {n:>7} {n_sh:>6} {cells} {total:>10.2f} {gb:>12.1f}"
            )
    (OUT / "summary.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
