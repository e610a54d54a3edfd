"""Overhead per refinement iteration of a finished run: wall clock against work.

    python bench/slurm_overhead.py WORKDIR [WORKDIR ...]

WORKDIR is a folder a run was started in (it holds .snakemake/log/ and
benchmarks/<run>/); give a local run and a SLURM run of the same config to
compare them (.ci/slurm.sh leaves both under /tmp/hetrefine-slurm.*/).

Per iteration i: wall = from the moment iteration i-1's references were done
(init_references for i = 1) to the moment iteration i's were (the "Finished"
lines of Snakemake's log, 1 s resolution); work = the slowest shard's align
plus the reconstruct (the aligns run side by side), from the rules' benchmark
files. Overhead = wall - work: the queue, status polling, and one Snakemake
start-up per job.
"""

from __future__ import annotations

import csv
import re
import sys
from datetime import datetime
from pathlib import Path

STAMP = "%a %b %d %H:%M:%S %Y"
FINISHED = re.compile(r"^\s*\[([^\]]+)\]\n\s*Finished jobid: (\d+) \(Rule: (\w+)\)", re.M)
JOB = re.compile(r"^\s*(?:local)?rule (\w+):\n((?:[ \t]+\w+: .*\n)+)", re.M)


def job_table(text: str) -> dict[int, tuple[str, str]]:
    """{jobid: (rule, iteration or "")} from the job listings of a Snakemake log."""
    jobs = {}
    for rule, block in JOB.findall(text):
        jobid = re.search(r"jobid: (\d+)", block)
        it = re.search(r"wildcards: .*?\bit=(\d+)", block)
        if jobid:
            jobs[int(jobid.group(1))] = (rule, it.group(1) if it else "")
    return jobs


def main_log(workdir: Path) -> str:
    """The newest Snakemake log that saw the last iteration's reconstruct finish."""
    for log in sorted((workdir / ".snakemake" / "log").glob("*.snakemake.log"), reverse=True):
        text = log.read_text(errors="replace")
        if "Finished jobid" in text and "(Rule: reconstruct)" in text:
            return text
    raise SystemExit(f"{workdir}: no Snakemake log with a finished reconstruct")


def seconds(tsv: Path) -> float:
    with tsv.open() as f:
        return float(next(csv.DictReader(f, delimiter="\t"))["s"])


def iterations(workdir: Path) -> tuple[str, list[dict]]:
    text = main_log(workdir)
    jobs = job_table(text)
    done = {}
    for stamp, j, rule in FINISHED.findall(text):
        done[(rule, jobs.get(int(j), (rule, ""))[1])] = datetime.strptime(stamp, STAMP)
    runs = [p for p in (workdir / "benchmarks").iterdir() if (p / "reconstruct").is_dir()]
    bench = runs[0]
    rows = []
    previous = done.get(("init_references", ""))
    it = 1
    while ("reconstruct", f"{it:03d}") in done:
        end = done[("reconstruct", f"{it:03d}")]
        aligns = [seconds(p) for p in (bench / "align").glob(f"iter_{it:03d}_shard_*.tsv")]
        work = max(aligns) + seconds(bench / "reconstruct" / f"iter_{it:03d}.tsv")
        wall = (end - previous).total_seconds() if previous else float("nan")
        rows.append({"it": it, "wall": wall, "work": work, "shards": len(aligns)})
        previous, it = end, it + 1
    submitted = len(re.findall(r"has been submitted with SLURM jobid", text))
    kind = f"SLURM, {submitted} sbatch jobs" if submitted else "local"
    return kind, rows


def report(workdir: Path) -> None:
    kind, rows = iterations(workdir)
    print(f"{workdir} ({kind})")
    print("  it  shards  wall s  work s  overhead s  overhead/wall")
    for r in rows:
        over = r["wall"] - r["work"]
        print(
            f"  {r['it']:2d}  {r['shards']:6d}  {r['wall']:6.0f}  {r['work']:6.1f}"
            f"  {over:10.1f}  {over / r['wall']:12.0%}"
        )
    wall = sum(r["wall"] for r in rows)
    work = sum(r["work"] for r in rows)
    print(
        f"  mean per iteration: wall {wall / len(rows):.1f} s, work {work / len(rows):.1f} s, "
        f"overhead {(wall - work) / len(rows):.1f} s"
    )


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for arg in sys.argv[1:]:
        report(Path(arg))
