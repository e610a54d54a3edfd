"""The whole workflow at scale, measured: wall and CPU time, memory per rule, temporary bytes.

    python bench/scale_run.py --name a50k --n 50000 --refine-box 64     # issue 17 item 5 (a)
    python bench/scale_run.py --name b10k --n 10000 --refine-box 128    # issue 17 item 5 (b)
    python bench/scale_run.py --name smoke2k --n 2000 --refine-box 64   # a cheap first try
    python bench/scale_run.py --name a50k --n 50000 --build-only        # only the data
    python bench/scale_run.py --name a50k --n 50000 --report-only       # re-read a run

Data (built once, seeded, cached in ``bench/out/scale_<name>/data``; the build runs in a
child under ``nice -n 10``: building is not what is measured): ``--n`` particles in
stacks of ``--stack-size`` (as an extraction writes one stack per micrograph group),
box 128 at 0.9 A/px, K = 4 classes: adenylate kinase open, half-way and closed and
the HIV-1 protease dimer (``engine_sets.state_volumes``, the maps of real atomic
models), with the CTF, envelope and white noise of ``bench/engine_sets.py``'s sets
(``hetrefine.simulate.simulate_from_volumes``, one call per stack, each writing through
a memory map in chunks: memory bounded by a chunk). One RELION 3.1 STAR file names
every stack (``000001@stacks/stack_003.mrcs``); ``truth.csv`` holds the classes.
Initial models: the truth maps low-passed to 30 A (as engine_sets).

Run (normal priority: this is what is measured): the workflow files are copied into
``bench/out/scale_<name>/work`` and run there as a user runs them,
``python -m snakemake --profile workflow/profiles/local --cores 2 --configfile
scale.yaml`` (the profile's ``workers``; ``scale.yaml`` names the particles, the
initial models, ``refine_box``, ``device: cpu``; everything else the shipped
defaults). While it runs, a sampler (every ``--sample-s`` seconds) records the load
average and every file under ``results/<run>``: a file seen during the run and absent
at its end is a temporary; its largest size counts for the iteration in its path.

Printed and written to ``bench/out/scale_<name>/result.json``: whole-workflow wall and
CPU seconds (``os.wait4`` of Snakemake: every job's CPU), the machine's busy CPU
seconds over the run (``/proc/stat``: the machine is shared, the rest is others'
work), per rule from Snakemake's benchmark files (jobs, wall max / sum, CPU sum, peak
RSS = max over jobs of max_rss, MB written = io_out sum), per iteration the align
and reconstruct wall and the temporary bytes, the class accuracy against the known
labels (best permutation) and the full-EM align rate per particle.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
COPY = ["Snakefile", "config.yaml", "workflow", "scripts", "envs", "profiles"]
STATES = (0.0, 0.5, 1.0)  # AdK open -> closed; the protease is the fourth class
BOX, PIXEL = 128, 0.9  # the stack (the refinement box is the run's)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_sets import models_dir, state_volumes  # noqa: E402
from memory_scaling import collect  # noqa: E402

# ----------------------------------------------------------------------------- data


def build(data: Path, n: int, stack_size: int, seed: int, snr: float) -> None:
    """Stacks of ``stack_size`` particles, a STAR file naming them, truth.csv, models."""
    import pandas as pd

    from hetrefine.io.atomic import write_text
    from hetrefine.io.star import read_star_blocks
    from hetrefine.simulate import SimulationSpec, simulate_from_volumes

    t0 = time.perf_counter()
    vols, other = state_volumes(models_dir(None), STATES, BOX, PIXEL)
    vols = [*vols, other]
    stacks = data / "stacks"
    stacks.mkdir(parents=True, exist_ok=True)
    parts, truths, optics = [], [], None
    for p, c0 in enumerate(range(0, n, stack_size)):
        m = min(stack_size, n - c0)
        part = data / "parts" / f"stack_{p:03d}"
        stack = stacks / f"stack_{p:03d}.mrcs"
        if not (part / "spec.json").exists() or not stack.exists():
            spec = SimulationSpec(
                n_particles=m,
                n_classes=len(vols),
                box=BOX,
                pixel_size=PIXEL,
                snr=snr,
                envelope_b=50.0,
                initial_lowpass_A=30.0,
                shift_max_px=4.0,  # 2 px in the refinement box of 64 (engine_sets' sets)
                seed=seed * 1000 + p,
            )
            simulate_from_volumes(spec, part, vols, other)
            os.replace(part / "particles.mrcs", stack)
            print(f"stack {p}: {c0 + m:,} of {n:,} particles, {time.perf_counter() - t0:.0f} s",
                  flush=True)  # fmt: skip
        blocks = read_star_blocks(part / "particles.star")
        optics = blocks["optics"]
        df = blocks["particles"].copy()
        df["rlnImageName"] = [f"{i + 1:06d}@stacks/{stack.name}" for i in range(m)]
        parts.append(df)
        t = pd.read_csv(part / "truth.csv")
        t["stack"], t["stack_index"] = stack.name, t["index"]
        t["index"] = t["index"] + c0
        truths.append(t)
    particles = pd.concat(parts, ignore_index=True)
    import starfile

    star = data / "particles.star"
    tmp = star.with_suffix(".tmp.star")
    starfile.write({"optics": optics, "particles": particles}, tmp, overwrite=True)
    os.replace(tmp, star)
    pd.concat(truths, ignore_index=True).to_csv(data / "truth.csv", index=False)
    first = data / "parts" / "stack_000"
    for k in range(len(vols)):
        for kind in ("initial_model", "truth_class"):
            shutil.copy2(first / f"{kind}_{k + 1:02d}.mrc", data / f"{kind}_{k + 1:02d}.mrc")
    spec = {"n": n, "box": BOX, "pixel_size": PIXEL, "k": len(vols), "snr": snr, "seed": seed,
            "stack_size": stack_size, "states": "AdK open, half-way, closed; HIV-1 protease",
            "build_s": time.perf_counter() - t0}  # fmt: skip
    write_text(data / "spec.json", json.dumps(spec, indent=1))
    print(f"built {n:,} particles in {time.perf_counter() - t0:.0f} s -> {data}", flush=True)


# ----------------------------------------------------------------------------- run


class Sampler(threading.Thread):
    """Load average and the files under a folder, every ``period`` seconds."""

    def __init__(self, folder: Path, period: float):
        super().__init__(daemon=True)
        self.folder, self.period = folder, period
        self.files: dict[str, int] = {}
        self.load: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def scan(self) -> None:
        stack = [self.folder]
        while stack:
            try:
                entries = list(os.scandir(stack.pop()))
            except OSError:
                continue
            for e in entries:
                try:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                    elif e.is_file(follow_symlinks=False):
                        size = e.stat(follow_symlinks=False).st_size
                        self.files[e.path] = max(size, self.files.get(e.path, 0))
                except OSError:
                    continue

    def run(self) -> None:
        t0 = time.time()
        while not self.stop.is_set():
            self.load.append((time.time() - t0, os.getloadavg()[0]))
            self.scan()
            self.stop.wait(self.period)


def busy_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the machine since boot (/proc/stat)."""
    vals = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = vals[3] + vals[4]
    return sum(vals) - idle, sum(vals)


def prepare(base: Path, data: Path, refine_box: int, overrides: dict) -> Path:
    work = base / "work"
    work.mkdir(parents=True, exist_ok=True)
    for name in COPY:
        src, dst = ROOT / name, work / name
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst)
    k = json.loads((data / "spec.json").read_text())["k"]
    cfg = {
        "run": "scale",
        "particles": str(data / "particles.star"),
        "initial_models": [str(data / f"initial_model_{i + 1:02d}.mrc") for i in range(k)],
        "refine_box": refine_box,
        "device": "cpu",
        **overrides,
    }
    (work / "scale.yaml").write_text(json.dumps(cfg, indent=1))  # JSON is YAML
    return work


def set_autogroup_nice(pid: int, nice: int) -> None:
    """The CPU weight of the session ``pid`` leads (its own: started with setsid).

    Where the kernel groups processes by session (``kernel.sched_autogroup_enabled``
    = 1, as here), a process's nice value weighs it only against the processes of its
    own session; sessions share the CPUs equally whatever their processes' nice values.
    So ``nice -n 10`` on others' work does not make room for a measured run: its
    session's weight (``/proc/<pid>/autogroup``) does."""
    path = Path(f"/proc/{pid}/autogroup")
    if nice and path.exists():
        path.write_text(str(nice))


def run(work: Path, cores: int, sample_s: float, autogroup_nice: int = 0) -> dict:
    """Snakemake as a user runs it, at this process's priority, sampled while it runs."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "snakemake", "--profile", "workflow/profiles/local",
           "--cores", str(cores), "--configfile", "scale.yaml"]  # fmt: skip
    sampler = Sampler(work / "results" / "scale", sample_s)
    sampler.start()
    b0, t0j = busy_jiffies()
    t0 = time.perf_counter()
    with open(work / "snakemake.log", "ab") as log:
        p = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)  # fmt: skip
        set_autogroup_nice(p.pid, autogroup_nice)
        _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    b1, t1j = busy_jiffies()
    sampler.stop.set()
    sampler.join()
    sampler.scan()
    hz = os.sysconf("SC_CLK_TCK")
    temps = {f: s for f, s in sampler.files.items() if not os.path.exists(f)}
    loads = [x for _, x in sampler.load]
    return {
        "command": " ".join(["python", *cmd[1:]]),
        "returncode": os.waitstatus_to_exitcode(status),
        "wall_s": wall,
        "cpu_s": ru.ru_utime + ru.ru_stime,
        "peak_rss_any_job_mib": ru.ru_maxrss / 1024,
        "machine_busy_cpu_s": (b1 - b0) / hz,
        "machine_cpus": os.cpu_count(),
        "load_1min": {
            "mean": float(np.mean(loads)),
            "max": float(np.max(loads)),
            "samples": len(loads),
        }
        if loads
        else None,  # fmt: skip
        "temporary_files": {os.path.relpath(f, work): s for f, s in sorted(temps.items())},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "autogroup_nice": autogroup_nice,
    }


# ----------------------------------------------------------------------------- figures


def per_iteration(work: Path, temps: dict, n_particles: int) -> dict:
    """Per iteration: align wall (longest job) and sum, reconstruct wall, reduce jobs,
    MB written by its jobs (io_out), temporary bytes seen (by the iteration in the path),
    and the sums files' bytes beside those of the same files at one per 500 particles
    (the sums file's size depends on the box, K and resolution, not on its particles;
    before ``shard_size: auto`` there was no reduce tree)."""
    import csv

    out: dict[int, dict] = {}
    bench = work / "benchmarks" / "scale"
    for tsv in bench.rglob("*.tsv"):
        m = re.search(r"iter_(\d{3})", tsv.name)
        if not m or tsv.parent.name not in ("align", "reconstruct", "reduce_sums"):
            continue
        it = out.setdefault(int(m.group(1)), {"align_jobs": 0, "align_max_s": 0.0,
                                               "align_sum_s": 0.0, "align_cpu_s": 0.0,
                                               "reconstruct_s": 0.0, "io_out_mb": 0.0})  # fmt: skip
        with open(tsv) as fh:
            row = next(csv.DictReader(fh, delimiter="\t"))
        s = float(row["s"])
        io = row.get("io_out", "NA")
        it["io_out_mb"] += float(io) if io not in ("NA", "", "-") else 0.0
        if tsv.parent.name == "align":
            it["align_jobs"] += 1
            it["align_max_s"] = max(it["align_max_s"], s)
            it["align_sum_s"] += s
            cpu = row.get("cpu_time", "NA")
            it["align_cpu_s"] += float(cpu) if cpu not in ("NA", "", "-") else 0.0
        elif tsv.parent.name == "reconstruct":
            it["reconstruct_s"] = s
    for f, size in temps.items():
        if Path(f).name.startswith("."):  # an atomic write in flight: the file, half written
            continue
        m = re.search(r"iter_(\d{3})", f)
        if m and int(m.group(1)) in out:
            it = out[int(m.group(1))]
            it["temp_bytes"] = it.get("temp_bytes", 0) + size
            it["temp_files"] = it.get("temp_files", 0) + 1
            if ".sums" in Path(f).name:
                it["sums_files"] = it.get("sums_files", 0) + 1
                it["sums_bytes"] = it.get("sums_bytes", 0) + size
                it["sums_file_max"] = max(it.get("sums_file_max", 0), size)
    for it in out.values():  # the same sums, one file per 500 particles (shard_size: 500)
        if it.get("sums_files"):
            it["sums_bytes_at_shard_500"] = (
                -(-n_particles // 500) * it["sums_bytes"] / it["sums_files"]
            )
    return dict(sorted(out.items()))


def accuracy(data: Path, work: Path) -> dict:
    """Class accuracy of the final assignment against truth.csv (best permutation)."""
    import pandas as pd
    from scipy.optimize import linear_sum_assignment

    from hetrefine.io.star import read_star_blocks

    star = work / "results" / "scale" / "particles_all.star"
    if not star.exists():
        return {"error": f"{star} not found"}
    blocks = read_star_blocks(star)
    parts = blocks.get("particles")
    truth = pd.read_csv(data / "truth.csv")
    key = {(s, int(i)): c for s, i, c in zip(truth["stack"], truth["stack_index"], truth["class"])}
    lab, pred = [], []
    for name, c in zip(parts["rlnImageName"], parts["rlnClassNumber"]):
        idx, stack = str(name).split("@", 1)
        lab.append(key[(Path(stack).name, int(idx) - 1)])
        pred.append(int(c))
    lab, pred = np.array(lab), np.array(pred)
    k = int(max(lab.max(), pred.max()))
    conf = np.zeros((k, k), int)
    np.add.at(conf, (lab - 1, pred - 1), 1)
    r, c = linear_sum_assignment(-conf)
    return {
        "accuracy": float(conf[r, c].sum() / len(lab)),
        "n": int(len(lab)),
        "confusion_truth_x_predicted": conf.tolist(),
        "class_sizes": np.bincount(pred, minlength=k + 1)[1:].tolist(),
    }


def report(res: dict) -> None:
    w = res["workflow"]
    print(f"\n{res['name']}: {res['n']:,} particles, stack box {BOX}, refine box "
          f"{res['refine_box']}, K 4; {w['command']} (rc {w['returncode']}), {w['date']}")  # fmt: skip
    print(f"whole workflow: {w['wall_s']:.0f} s wall ({w['wall_s'] / 60:.1f} min), "
          f"{w['cpu_s']:.0f} s CPU; machine busy {w['machine_busy_cpu_s']:.0f} CPU s of "
          f"{w['machine_cpus'] * w['wall_s']:.0f} (others' work = busy - ours); load average "
          f"(1 min) mean {w['load_1min']['mean']:.2f}, max {w['load_1min']['max']:.2f}")  # fmt: skip
    print(f"{'rule':<18}{'jobs':>5}{'wall max s':>11}{'wall sum s':>11}{'CPU s':>9}"
          f"{'peak RSS MB':>12}{'MB written':>11}")  # fmt: skip
    for name, r in res["rules"].items():
        print(f"{name:<18}{r['jobs']:>5}{r['max_s']:>11.1f}{r['sum_s']:>11.1f}"
              f"{r['cpu_s']:>9.1f}{r['max_rss_mb']:>12.0f}{r['io_out_mb']:>11.0f}")  # fmt: skip
    print(f"{'iteration':<10}{'aligns':>7}{'align max s':>12}{'align CPU s':>12}"
          f"{'recon s':>9}{'MB written':>11}{'temp files':>11}{'temp MB':>9}{'sums MB':>9}"
          f"{'@500 MB':>11}")  # fmt: skip
    for it, r in res["iterations"].items():
        print(f"{it:<10}{r['align_jobs']:>7}{r['align_max_s']:>12.1f}{r['align_cpu_s']:>12.1f}"
              f"{r['reconstruct_s']:>9.1f}{r['io_out_mb']:>11.0f}{r.get('temp_files', 0):>11}"
              f"{r.get('temp_bytes', 0) / 1e6:>9.1f}{r.get('sums_bytes', 0) / 1e6:>9.1f}"
              f"{r.get('sums_bytes_at_shard_500', 0) / 1e6:>11.1f}")  # fmt: skip
    a = res.get("accuracy", {})
    if "accuracy" in a:
        print(f"accuracy {100 * a['accuracy']:.2f}% of {a['n']:,} (class sizes {a['class_sizes']})")
    if res.get("full_em_align_cpu_ms_per_particle"):
        print(f"full-EM align: {res['full_em_align_cpu_ms_per_particle']:.2f} CPU ms per "
              f"particle (K 4, refine box {res['refine_box']})")  # fmt: skip


def rules_with_cpu(work: Path) -> dict:
    """collect() plus the CPU seconds and MB written summed over each rule's jobs."""
    import csv

    from memory_scaling import rule_of

    rules = collect(work)
    root = work / "benchmarks"
    for r in rules.values():
        r["cpu_s"], r["io_out_mb"] = 0.0, 0.0
    for tsv in sorted(root.rglob("*.tsv")):
        with open(tsv) as fh:
            for row in csv.DictReader(fh, delimiter="\t"):
                r = rules[rule_of(tsv, root)]
                for col, key in (("cpu_time", "cpu_s"), ("io_out", "io_out_mb")):
                    if row.get(col, "NA") not in ("NA", "", "-"):
                        r[key] += float(row[col])
    return rules


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True, help="cache folder bench/out/scale_<name>")
    ap.add_argument("--n", type=int, required=True, help="particles")
    ap.add_argument("--refine-box", type=int, default=64)
    ap.add_argument("--stack-size", type=int, default=5000, help="particles per stack file")
    ap.add_argument("--snr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--sample-s", type=float, default=2.0)
    ap.add_argument("--config", nargs="*", default=[], help="key=value overrides (JSON values)")
    ap.add_argument(
        "--autogroup-nice",
        type=int,
        default=0,
        help="the run's session weight (set_autogroup_nice; -10 = what nice 10 on the others' "
        "work would give it without session grouping)",
    )
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--build-here", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--report-only", action="store_true")
    a = ap.parse_args()
    base = OUT / f"scale_{a.name}"
    data = base / "data"
    if a.build_here:
        build(data, a.n, a.stack_size, a.seed, a.snr)
        return
    # built in a child under nice -n 10, in a session of its own at the default session
    # weight: below a run given --autogroup-nice -10, level with others' sessions
    if not (data / "spec.json").exists():
        cmd = ["nice", "-n", "10", sys.executable, __file__, "--name", a.name, "--n", str(a.n),
               "--stack-size", str(a.stack_size), "--seed", str(a.seed), "--snr", str(a.snr),
               "--build-here"]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
        p = subprocess.Popen(cmd, env=env, start_new_session=True)  # a session of its own
        if p.wait() != 0:
            sys.exit("the build failed")
    if a.build_only:
        return
    work = base / "work"
    result = base / "result.json"
    if a.report_only:
        res = json.loads(result.read_text())
    else:
        overrides = {k: json.loads(v) for k, v in (c.split("=", 1) for c in a.config)}
        work = prepare(base, data, a.refine_box, overrides)
        print(f"running the workflow in {work} ...", flush=True)
        res = {"name": a.name, "n": a.n, "refine_box": a.refine_box, "overrides": overrides,
               "workflow": run(work, a.cores, a.sample_s, a.autogroup_nice)}  # fmt: skip
    res["rules"] = rules_with_cpu(work)
    res["iterations"] = per_iteration(work, res["workflow"]["temporary_files"], a.n)
    res["accuracy"] = accuracy(data, work)
    cfg = json.loads((work / "scale.yaml").read_text())
    from hetrefine.config import defaults

    n_online = cfg.get("online_em_iterations", defaults()["online_em_iterations"])
    full = [r for i, r in res["iterations"].items() if int(i) > n_online and r["align_cpu_s"]]
    if full:
        res["full_em_align_cpu_ms_per_particle"] = (
            1e3 * float(np.mean([r["align_cpu_s"] for r in full])) / a.n
        )
        res["full_em_align_wall_s"] = float(np.mean([r["align_max_s"] for r in full]))
    result.write_text(json.dumps(res, indent=1))
    report(res)
    if res["workflow"]["returncode"] != 0:
        sys.exit(f"the workflow failed; see {work / 'snakemake.log'}")


if __name__ == "__main__":
    main()
