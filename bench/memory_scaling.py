"""Peak memory and wall time per Snakemake rule vs the number of particles (memory must stay flat).

    python bench/memory_scaling.py                       # 1,000 and 10,000 particles
    python bench/memory_scaling.py --sizes 1000 10000 50000 --cores 2
    python bench/memory_scaling.py --sizes 1000 --report-only   # re-read finished runs

For each size N the workflow (Snakefile, config.yaml, workflow/, scripts/,
envs/) is copied into ``bench/out/memory/n<N>/`` and run there with
``python -m snakemake --cores C --configfile bench.yaml`` on the simulated
demo at N particles, box 32 (4 A/px), K 2, 2 iterations, shard_size 500, and
``online_em_iterations: 0`` (so every iteration aligns every particle; with
online EM the first iterations would touch only a batch of particles and hide
the growth). A finished run (``run.json`` present) is only re-read unless ``--rerun``
(which deletes nothing: Snakemake then finds nothing to do unless inputs changed).

Prints, per rule: the number of jobs, the largest peak RSS over its jobs (the
``max_rss`` column, MB, of the benchmark tsv files Snakemake writes under
``benchmarks/``), and the longest and summed wall time; then the ratio of
each rule's peak RSS at the largest N to that at the smallest N.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "memory"
COPY = ["Snakefile", "config.yaml", "workflow", "scripts", "envs"]


def prepare(n: int, box: int, iterations: int, shard_size: int) -> Path:
    """A copy of the workflow in ``bench/out/memory/n<N>`` with the benchmark's config overrides."""
    d = OUT / f"n{n}"
    d.mkdir(parents=True, exist_ok=True)
    for name in COPY:
        src, dst = ROOT / name, d / name
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst)
    cfg = {
        "run": "mem",
        "demo": {
            "n_particles": n,
            "n_classes": 2,
            "box": box,
            "pixel_size": 4.0,
            "snr": 0.1,
            "seed": 0,
        },
        "iterations": iterations,
        "online_em_iterations": 0,
        "shard_size": shard_size,
        "device": "cpu",
    }
    (d / "bench.yaml").write_text(json.dumps(cfg, indent=1))  # JSON is YAML
    return d


def run(d: Path, cores: int, threads: int) -> dict:
    """Run snakemake in ``d``; wall and CPU seconds of the whole run (children included)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "snakemake", "--cores", str(cores), "--configfile", "bench.yaml",
           "--rerun-incomplete", "--nolock"]  # fmt: skip
    t0 = time.perf_counter()
    with open(d / "snakemake.log", "ab") as log:
        p = subprocess.Popen(cmd, cwd=d, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        sys.exit(f"snakemake failed in {d} (rc {rc}); see {d / 'snakemake.log'}")
    return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "command": " ".join(cmd[1:])}


def rule_of(tsv: Path, bench_root: Path) -> str:
    """Rule name from a benchmark path: benchmarks/<run>/<rule>/... or benchmarks/<run>/<rule>.tsv."""
    rel = tsv.relative_to(bench_root)
    if rel.parts[0] == "demo_data":
        return "simulate_demo"
    parts = rel.parts[1:]
    return parts[0] if len(parts) > 1 else Path(parts[0]).stem


def collect(d: Path) -> dict:
    """Per rule: jobs, max peak RSS (MB), max and total wall seconds, from the benchmark tsvs."""
    root = d / "benchmarks"
    rules: dict[str, dict] = {}
    for tsv in sorted(root.rglob("*.tsv")):
        with open(tsv) as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        for row in rows:
            r = rules.setdefault(
                rule_of(tsv, root), {"jobs": 0, "max_rss_mb": 0.0, "max_s": 0.0, "sum_s": 0.0}
            )
            rss = row.get("max_rss", "NA")
            r["jobs"] += 1
            if rss not in ("NA", "", "-"):
                r["max_rss_mb"] = max(r["max_rss_mb"], float(rss))
            r["max_s"] = max(r["max_s"], float(row["s"]))
            r["sum_s"] += float(row["s"])
    return rules


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--box", type=int, default=32)
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=500)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="OMP/OPENBLAS threads per job")
    ap.add_argument("--report-only", action="store_true", help="only read finished runs")
    ap.add_argument(
        "--rerun", action="store_true", help="run again even where a finished run exists"
    )
    a = ap.parse_args()
    results = {}
    for n in a.sizes:
        d = OUT / f"n{n}"
        info = {}
        if (d / "run.json").exists() and not a.rerun:
            print(f"N={n}: finished run found in {d} (--rerun to run again)", flush=True)
            info = json.loads((d / "run.json").read_text())
        elif not a.report_only:
            d = prepare(n, a.box, a.iterations, a.shard_size)
            print(f"N={n}: running snakemake in {d} ...", flush=True)
            info = run(d, a.cores, a.threads)
            (d / "run.json").write_text(json.dumps(info, indent=1))
        results[n] = {"rules": collect(d), **info}
    sizes = [n for n in a.sizes if results[n]["rules"]]
    if not sizes:
        sys.exit("no benchmark files found")
    order = ["simulate_demo", "preprocess", "make_mask", "init_references", "align", "reconstruct",
             "hard_sums", "write_classes", "plots"]  # fmt: skip
    names = [r for r in order if any(r in results[n]["rules"] for n in sizes)]
    names += sorted({r for n in sizes for r in results[n]["rules"]} - set(names))
    cmds = sorted({results[n].get("command", "") for n in sizes} - {""})
    print(
        f"\nbox {a.box}, K 2, {a.iterations} iterations, shard_size {a.shard_size}, "
        f"{a.threads} BLAS thread(s) per job; run as: {' | '.join(cmds) or '(unknown)'}; "
        f"peak RSS = max over the rule's jobs of max_rss (MB); wall = longest job / sum over jobs (s)"
    )
    head = f"{'rule':<16}" + "".join(f"{'N=' + str(n):>28}" for n in sizes) + f"{'RSS ratio':>11}"
    print(head)
    print(f"{'':<16}" + "".join(f"{'jobs  RSS MB  wall max/sum':>28}" for _ in sizes))
    for name in names:
        cells = []
        for n in sizes:
            r = results[n]["rules"].get(name)
            cells.append(
                f"{r['jobs']:>5} {r['max_rss_mb']:>7.0f} {r['max_s']:>6.1f}/{r['sum_s']:<7.1f}"
                if r
                else f"{'-':>27}"
            )
        first, last = results[sizes[0]]["rules"].get(name), results[sizes[-1]]["rules"].get(name)
        ratio = (
            f"{last['max_rss_mb'] / first['max_rss_mb']:.2f}"
            if first and last and first["max_rss_mb"]
            else "-"
        )
        print(f"{name:<16}" + "".join(f"{c:>28}" for c in cells) + f"{ratio:>11}")
    for n in sizes:
        if "wall_s" in results[n]:
            print(
                f"N={n}: whole workflow {results[n]['wall_s']:.0f} s wall, {results[n]['cpu_s']:.0f} s CPU"
            )
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "summary.json").write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
