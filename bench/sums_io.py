"""Temporary bytes per iteration: per-shard sums of 500 particles vs shards over the workers.

    python bench/sums_io.py                      # plan figures + a small measured run
    python bench/sums_io.py --n 2000 --box 32    # the measured run's size

Part 1 (the plan, no run): sums files and bytes written (and read) per iteration at
N particles, refinement box D, K classes, for ``shard_size: 500`` (before) and
``shard_size: auto`` over ``workers`` (now, with the reduce tree), from
``hetrefine.plan`` (the same grid function the align step sizes its sums with).

Part 2 (measured): the one-process pipeline (``hetrefine.pipeline``) on a simulated set,
one full-EM iteration, once with ``shard_size: 500``-style shards (``--old-shard``) and
once with ``auto`` over ``--workers``; every ``.sums.npz`` and ``.chunks-`` temporary
written is counted (bytes, files), with the CPU seconds, and the two iterations'
references compared (they differ only in the order the sums are added).
Writes ``bench/out/sums_io_<tag>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"


def plan_table(n: int, box: int, k: int, workers: list[int]) -> list[dict]:
    from hetrefine import plan

    per_file = plan.sums_file_bytes(box, k)
    old = math.ceil(n / 500)
    rows = [{"config": "shard_size 500 (before)", "shards": old, "tree": 0, "files": old}]
    for w in workers:
        shards = plan.n_shards(n, "auto", w)
        tree = sum(plan.reduce_levels(shards))
        rows.append(
            {"config": f"auto, workers {w}", "shards": shards, "tree": tree, "files": shards + tree}
        )
    for r in rows:
        r["bytes"] = r["files"] * per_file
        r["percent_of_before"] = 100.0 * r["files"] / old
    return rows


def measured(n: int, box: int, k: int, old_shard: int, workers: int, work: Path) -> dict:
    from hetrefine.config import defaults
    from hetrefine.io import atomic, run_files
    from hetrefine.pipeline import run_pipeline
    from hetrefine.simulate import SimulationSpec, simulate_dataset

    data = work / "data"
    if not (data / "particles.star").exists():
        simulate_dataset(
            SimulationSpec(n_particles=n, n_classes=k, box=box, pixel_size=4.0, snr=0.1, seed=0),
            data,
        )
    models = [str(data / f"initial_model_{i + 1:02d}.mrc") for i in range(k)]
    written: list[tuple[str, int]] = []
    real = atomic.os.replace

    def counting_replace(src, dst):  # every atomic write ends in os.replace
        real(src, dst)
        if str(dst).endswith(".sums.npz") or ".chunks-" in str(dst):
            written.append((str(dst), Path(dst).stat().st_size))

    atomic.os.replace = counting_replace
    out = {}
    try:
        for tag, size in (("before", old_shard), ("auto", "auto")):
            cfg = defaults()
            cfg.update(
                iterations=1, online_em_iterations=0, shard_size=size, workers=workers,
                coarse_angle_step_deg=30, local_refine_levels=1, device="cpu",
            )  # fmt: skip
            written.clear()
            t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_utime
            run = run_pipeline(
                str(data / "particles.star"), models, str(work / tag), cfg, final_outputs=False
            )
            out[tag] = {
                "shards": run.n_shards,
                "sums_files": sum(1 for p, _ in written if p.endswith(".sums.npz")),
                "sums_bytes": sum(b for p, b in written if p.endswith(".sums.npz")),
                "chunk_temp_bytes": sum(b for p, b in written if ".chunks-" in p),
                "wall_s": time.perf_counter() - t0,
                "cpu_s": resource.getrusage(resource.RUSAGE_SELF).ru_utime - c0,
            }
            out[tag]["maps"] = run_files.read_references(run.references(1))["maps"]
    finally:
        atomic.os.replace = real
    a, b = out["before"].pop("maps"), out["auto"].pop("maps")
    out["max_map_difference_rel"] = float(np.abs(a - b).max() / np.abs(a).max())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="particles of the measured run")
    ap.add_argument("--box", type=int, default=32)
    ap.add_argument("--old-shard", type=int, default=250, help="shard size of the 'before' run")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--plan-n", type=int, default=50_000)
    ap.add_argument("--plan-box", type=int, default=64)
    ap.add_argument("--plan-k", type=int, default=4)
    ap.add_argument("--skip-run", action="store_true")
    a = ap.parse_args()
    res = {"plan": plan_table(a.plan_n, a.plan_box, a.plan_k, [2, 4, 32])}
    for r in res["plan"]:
        print(
            f"N {a.plan_n}, box {a.plan_box}, K {a.plan_k}, {r['config']:24s}: {r['shards']:4d} shards "
            f"+ {r['tree']} tree = {r['files']:4d} files, {r['bytes'] / 1e9:6.2f} GB "
            f"({r['percent_of_before']:.1f}%)"
        )
    if not a.skip_run:
        work = OUT / f"sums_io_n{a.n}_box{a.box}"
        res["measured"] = measured(a.n, a.box, 2, a.old_shard, a.workers, work)
        print(json.dumps(res["measured"], indent=1))
    (OUT / f"sums_io_n{a.plan_n}_box{a.plan_box}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
