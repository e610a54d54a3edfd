"""Pre-flight accuracy: the estimated memory and time of an align job and of one
iteration against measured ones, on a simulated data set (default 10,000 particles).

    python bench/preflight_accuracy.py                      # 10,000 particles, box 48, K 2
    python bench/preflight_accuracy.py --n 2000 --box 96 --k 3 --shards 2

Simulates the set, runs the pre-flight check (which times a small sample), then
runs the workflow's own steps: preprocess, mask, init, and one full-EM iteration
at the highest resolution (scripts/align.py per shard, each under
/usr/bin/time -v for its peak RSS, then scripts/reconstruct.py). Prints
estimate vs measured and the ratio. The align jobs run one after another, as on
a machine where one job uses all the cores (`--shards` limits how many are run;
the iteration time is then extrapolated from the measured jobs).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], threads: int) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of a command, via /usr/bin/time -v."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    return wall, rss_kb * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10000, help="particles")
    ap.add_argument("--box", type=int, default=48)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=500)
    ap.add_argument("--shards", type=int, default=3, help="align jobs actually run (0 = all)")
    ap.add_argument("--cores", type=int, default=os.cpu_count())
    ap.add_argument("--workdir", help="keep the files here (default: a temporary folder)")
    a = ap.parse_args()

    from hetrefine.config import load_config
    from hetrefine.pipeline import prepare_run
    from hetrefine.plan import ALIGN_THREADS
    from hetrefine.preflight import run_preflight
    from hetrefine.schedule import resolution_limit_px
    from hetrefine.simulate import SimulationSpec, simulate_dataset

    work = Path(a.workdir or tempfile.mkdtemp(prefix="preflight-bench-"))
    data = work / "data"
    t0 = time.perf_counter()
    simulate_dataset(
        SimulationSpec(n_particles=a.n, n_classes=a.k, box=a.box, pixel_size=4.0 * 48 / a.box),
        data,
    )
    print(f"simulated {a.n} particles, box {a.box}, K {a.k} in {time.perf_counter() - t0:.0f} s")
    models = [str(data / f"initial_model_{k + 1:02d}.mrc") for k in range(a.k)]
    conf_file = work / "config.yaml"
    conf_file.write_text(
        json.dumps(
            {
                "run": "bench",
                "particles": str(data / "particles.star"),
                "initial_models": models,
                "shard_size": a.shard_size,
                "device": "cpu",
            }
        )
    )
    config = load_config(conf_file)
    rep = run_preflight(config, work, cores=a.cores)
    print(rep)
    if not rep.ok:
        sys.exit(1)
    f = rep.facts
    out = work / "run"
    n_shards = f["n_shards"]
    run = prepare_run(config["particles"], models, str(out), config)
    it0 = out / "iter_000"
    # a late, full-EM iteration: highest resolution, every particle
    model = json.loads((it0 / "model.json").read_text())
    model["res_limit_px"] = resolution_limit_px(
        a.box / 2, a.box, f["pixel_size"], config["max_resolution_A"]
    )
    (it0 / "model.json").write_text(json.dumps(model))
    conf_file.write_text(json.dumps(dict(config, online_em_iterations=0)))
    threads = min(ALIGN_THREADS, a.cores)
    run_n = n_shards if a.shards == 0 else min(a.shards, n_shards)
    walls, rsss, sums, assigns = [], [], [], []
    for s in range(run_n):
        assign, sm = out / f"a_{s:04d}.npz", out / f"s_{s:04d}.npz"
        wall, rss = timed(
            [
                sys.executable,
                str(ROOT / "scripts" / "align.py"),
                "--chunks",
                *run.chunks[s],
                "--refs",
                str(it0 / "references.npz"),
                "--model",
                str(it0 / "model.json"),
                "--mask",
                str(out / "mask.mrc"),
                "--focus-mask",
                str(out / "mask_focus.mrc"),
                "--iteration",
                str(config["iterations"]),
                "--out-assign",
                str(assign),
                "--out-sums",
                str(sm),
                "--config",
                str(conf_file),
                "--threads",
                str(threads),
                "--log",
                str(out / "align.log"),
            ],
            threads,
        )
        walls.append(wall)
        rsss.append(rss)
        sums.append(str(sm))
        assigns.append(str(assign))
        print(f"align shard {s}: {wall:.1f} s, peak RSS {rss / 2**20:.0f} MB")
    rec_wall, rec_rss = timed(
        [
            sys.executable,
            str(ROOT / "scripts" / "reconstruct.py"),
            "--assign",
            *assigns,
            "--sums",
            *sums,
            "--prev-model",
            str(it0 / "model.json"),
            "--prev-refs",
            str(it0 / "references.npz"),
            "--prev-assign",  # this iteration's, as the previous one's (changed fraction only)
            *assigns,
            "--mask",
            str(out / "mask.mrc"),
            "--iteration",
            str(config["iterations"]),
            "--out-refs",
            str(out / "r.npz"),
            "--out-model",
            str(out / "m.json"),
            "--config",
            str(conf_file),
            "--log",
            str(out / "rec.log"),
        ],
        min(8, a.cores),
    )
    # extrapolate: full shards are all alike; the last one may be smaller
    job = sum(walls[: max(1, min(len(walls), n_shards - 1))]) / max(
        1, min(len(walls), n_shards - 1)
    )
    parallel = max(1, a.cores // threads)
    iter_measured = -(-n_shards // parallel) * job + rec_wall
    rows = [
        ("align job memory", f["align_mem_bytes"] / 2**20, max(rsss) / 2**20, "MB"),
        ("reconstruct memory", f["reconstruct_mem_bytes"] / 2**20, rec_rss / 2**20, "MB"),
        ("align job time", f["align_job_s"], job, "s"),
        ("reconstruct time", f["reconstruct_s"], rec_wall, "s"),
        ("iteration time", f["iteration_s"], iter_measured, "s"),
    ]
    print(
        f"\n{a.n} particles, box {a.box}, K {a.k}, {n_shards} shards of {a.shard_size}, "
        f"{a.cores} cores ({run_n} align jobs measured)"
    )
    print(f"{'quantity':22s} {'estimate':>10s} {'measured':>10s} {'ratio':>6s}")
    for name, est, meas, unit in rows:
        print(f"{name:22s} {est:9.1f}{unit:>1s} {meas:9.1f}{unit:>1s} {est / meas:6.2f}")


if __name__ == "__main__":
    main()
