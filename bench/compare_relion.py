"""Accuracy, resolution, time and memory: our engine vs RELION 3.1 class3D on simulated data.

    python bench/compare_relion.py                          # set (a): 2,000 particles, box 64, K 2, SNR 0.05, seed 0
    python bench/compare_relion.py --seed 1 --threads 1     # another data seed
    python bench/compare_relion.py --relion background      # start RELION detached, return at once
    python bench/compare_relion.py --relion cached          # print RELION's cached result only (never runs it)
    python bench/compare_relion.py --set b --relion skip    # set (b): 10,000 particles, box 64, K 3, ours alone

Set (a) is simulated with ``hetrefine.simulate`` (seed from the command line)
into ``bench/out/compare/<set>_seed<seed>/data``; both programs read the same
``particles.star`` and start from the same ``initial_model_XX.mrc``.

Ours: ``hetrefine.pipeline.run_pipeline`` with ``hetrefine.config.defaults()``
(the data's particles/models filled in), run in a child process whose
``OMP_NUM_THREADS``/``OPENBLAS_NUM_THREADS``/``MKL_NUM_THREADS`` are set before
numpy is imported.

RELION: ``relion_refine --K <K>`` with RELION's usual class3D settings (25
iterations, healpix order 2, tau2_fudge 4, CTF, particle diameter 0.75 x box x
pixel, flatten solvent + zero mask, offset range 5 / step 2 px, C1, norm and
scale correction, pad 2, ``--firstiter_cc`` because the initial models are not
on the images' absolute grey scale (as with ab-initio maps from another
program), ``--dont_check_norm`` because the simulated images are not
normalised to unit background (ours normalises them itself), ``--ini_high`` =
our ``initial_lowpass_A``, ``--j`` = our thread count). It takes about an hour
on one core, so it is resumable (``--continue`` from the newest
``run_itNNN_optimiser.star``; the CPU/wall time of every segment is added up)
and its result is cached in ``bench/out/compare/relion_<set>_seed<seed>.json``:
a second invocation prints the cached result.

Measured for each program (as a child process, via ``os.wait4``): wall time,
CPU time (user + sys: the machine is shared, CPU time is the fairer measure),
peak RSS, CPU/wall. Accuracy: fraction of particles in the right class under the
best permutation of class labels against ``truth.csv`` (matched by image name,
not by row order). Resolution: FSC of each class map (permuted) against its
truth map inside the soft spherical mask at the particle diameter; the shells
where it crosses 0.5 and 0.143, in Angstrom.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "compare"

SETS = {
    "a": dict(n_particles=2000, box=64, n_classes=2, snr=0.05),
    "b": dict(n_particles=10000, box=64, n_classes=3, snr=0.05),
}
PIXEL = 4.0
RELION_ITER = 25


# ----------------------------------------------------------------------------- helpers


def set_dir(which: str, seed: int) -> Path:
    return OUT / f"{which}_seed{seed}"


def thread_env(threads: int) -> dict:
    """Environment with every BLAS/OpenMP thread count set to ``threads``."""
    t = str(threads)
    return dict(
        os.environ,
        OMP_NUM_THREADS=t,
        OPENBLAS_NUM_THREADS=t,
        MKL_NUM_THREADS=t,
        NUMEXPR_NUM_THREADS=t,
    )


def run_child(cmd: list[str], env: dict, cwd: Path, log_path: Path) -> dict:
    """Run ``cmd`` and return wall s, user s, sys s, peak RSS (MiB) and return code of that child.

    Uses ``os.wait4`` so the figures are this child's (its own waited-for
    descendants included), not those of other children of this process.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    return {
        "wall_s": wall,
        "user_s": ru.ru_utime,
        "sys_s": ru.ru_stime,
        "cpu_s": ru.ru_utime + ru.ru_stime,
        "max_rss_mib": ru.ru_maxrss / 1024.0,  # Linux: kilobytes
        "returncode": p.returncode,
    }


#: A child process running the one-process driver on a saved config (argv: config, out).
PIPELINE_CHILD = (
    "import json, sys, logging; logging.basicConfig(level=logging.INFO, "
    "format='%(asctime)s %(message)s');"
    "from hetrefine.pipeline import run_pipeline;"
    "c = json.load(open(sys.argv[1]));"
    "run_pipeline(c['particles'], c['initial_models'], sys.argv[2], c)"
)


def run_pipeline_child(cfg_path: Path, out: Path, env: dict, log_path: Path) -> dict:
    """Our whole pipeline on the config saved at ``cfg_path`` into ``out``, in a child
    process (:func:`run_child`: wall, CPU, peak RSS, return code)."""
    return run_child(
        [sys.executable, "-c", PIPELINE_CHILD, str(cfg_path), str(out)], env, ROOT, log_path
    )


def simulate(which: str, seed: int) -> Path:
    """Simulate the set (once) and return its data folder."""
    from hetrefine.simulate import SimulationSpec, simulate_dataset

    data = set_dir(which, seed) / "data"
    if (data / "spec.json").exists() and (data / "particles.star").exists():
        return data
    spec = SimulationSpec(pixel_size=PIXEL, seed=seed, **SETS[which])
    t0 = time.perf_counter()
    simulate_dataset(spec, data)
    print(
        f"simulated set {which} (seed {seed}) in {time.perf_counter() - t0:.1f} s -> {data}",
        flush=True,
    )
    return data


def our_config(data: Path, out: Path) -> dict:
    from hetrefine.config import defaults, validate_config

    spec = json.loads((data / "spec.json").read_text())
    cfg = defaults()
    cfg["particles"] = str(data / "particles.star")
    cfg["initial_models"] = [
        str(data / f"initial_model_{k + 1:02d}.mrc") for k in range(spec["n_classes"])
    ]
    cfg["run"] = out.name
    return validate_config(cfg)


# ----------------------------------------------------------------------------- evaluation


def _truth(data: Path):
    import pandas as pd

    t = pd.read_csv(data / "truth.csv")
    return dict(zip([f"{i + 1:06d}" for i in t["index"]], t["class"].to_numpy()))


def _labels_by_image(star: Path, truth: dict):
    """(truth class, predicted class) arrays matched by image number in ``rlnImageName``."""
    import numpy as np

    from hetrefine.io.star import read_star_blocks

    blocks = read_star_blocks(star)
    parts = blocks.get("particles")
    if parts is None:
        parts = next(b for b in blocks.values() if "rlnImageName" in b.columns)
    keys = [str(n).split("@")[0].zfill(6) for n in parts["rlnImageName"]]
    pred = parts["rlnClassNumber"].to_numpy().astype(int)
    t = np.array([truth[k] for k in keys])
    in_order = bool(np.all(np.diff([int(k) for k in keys]) > 0))
    return t, pred, in_order


def best_permutation(pred, truth, k_pred: int, k_true: int) -> tuple[float, tuple]:
    """The accuracy of the predicted classes ``pred`` (1-based) against ``truth``
    (1..k_true) under the best assignment of predicted to true classes, and that
    assignment: perm[j] = the predicted class that stands for truth class j + 1."""
    import numpy as np

    pred, truth = np.asarray(pred), np.asarray(truth)
    best, best_perm = -1.0, None
    for perm in itertools.permutations(range(1, k_pred + 1), k_true):
        acc = float(np.mean(np.asarray(perm)[truth - 1] == pred))
        if acc > best:
            best, best_perm = acc, perm
    return best, best_perm


def evaluate(data: Path, star: Path, maps: list[Path]) -> dict:
    """Accuracy (best permutation) and per-class FSC crossings against the truth maps."""
    import numpy as np

    from hetrefine.fsc import fsc, resolution_angstrom
    from hetrefine.io.mrc import read_volume
    from hetrefine.mask import soft_sphere

    spec = json.loads((data / "spec.json").read_text())
    k_true = spec["n_classes"]
    t, pred, in_order = _labels_by_image(star, _truth(data))
    good = t > 0
    k_pred = len(maps)
    best, best_perm = best_permutation(pred[good], t[good], k_pred, k_true)
    box, px = spec["box"], spec["pixel_size"]
    diam = 0.75 * box * px
    mask = soft_sphere(box, px, diam, min(1.2 * diam, box * px))
    per_class = []
    for j, p in enumerate(best_perm):
        truth_map, _ = read_volume(data / f"truth_class_{j + 1:02d}.mrc")
        m, _ = read_volume(maps[p - 1])
        curve = fsc(m.astype(np.float32), truth_map.astype(np.float32), mask)
        per_class.append(
            {
                "truth_class": j + 1,
                "predicted_class": p,
                "fsc05_A": resolution_angstrom(curve, box, px, 0.5),
                "fsc0143_A": resolution_angstrom(curve, box, px, 0.143),
                "n_assigned": int(np.sum(pred == p)),
            }
        )
    return {
        "accuracy": best,
        "n_particles": int(len(t)),
        "class_sizes": np.bincount(pred, minlength=k_pred + 1)[1:].tolist(),
        "star_in_input_order": in_order,
        "per_class": per_class,
        "nyquist_A": 2 * px,
    }


# ----------------------------------------------------------------------------- ours


def run_ours(which: str, seed: int, threads: int) -> dict:
    """Our whole pipeline in a child process; cached in ours_<set>_seed<seed>_t<threads>.json."""
    cache = OUT / f"ours_{which}_seed{seed}_t{threads}.json"
    data = simulate(which, seed)
    out = set_dir(which, seed) / f"ours_t{threads}"
    cfg_path = set_dir(which, seed) / f"ours_t{threads}_config.json"
    cfg_path.write_text(json.dumps(our_config(data, out)))
    print(f"ours: set {which}, seed {seed}, {threads} thread(s) -> {out}", flush=True)
    m = run_pipeline_child(
        cfg_path, out, thread_env(threads), set_dir(which, seed) / f"ours_t{threads}.log"
    )
    if m["returncode"] != 0:
        sys.exit(f"our pipeline failed; see {set_dir(which, seed) / f'ours_t{threads}.log'}")
    cfg = json.loads(cfg_path.read_text())
    k = len(cfg["initial_models"])
    res = {
        "program": "hetrefine",
        "set": which,
        "seed": seed,
        "threads": threads,
        "iterations": cfg["iterations"],
        **m,
        **evaluate(
            data,
            out / "particles_all.star",
            [out / f"class_{i + 1:03d}" / "map.mrc" for i in range(k)],
        ),
    }
    cache.write_text(json.dumps(res, indent=1))
    return res


# ----------------------------------------------------------------------------- RELION


def relion_dir(which: str, seed: int) -> Path:
    return set_dir(which, seed) / "relion"


def relion_cache(which: str, seed: int) -> Path:
    return OUT / f"relion_{which}_seed{seed}.json"


def relion_command(data: Path, rdir: Path, threads: int, seed: int) -> list[str]:
    """The relion_refine class3D command line (fresh start or ``--continue``)."""
    spec = json.loads((data / "spec.json").read_text())
    k = spec["n_classes"]
    box, px = spec["box"], spec["pixel_size"]
    done = sorted(rdir.glob("run_it[0-9][0-9][0-9]_optimiser.star"))
    if done:
        return [
            "relion_refine", "--continue", str(done[-1].resolve()), "--o", str((rdir / "run").resolve()),
            "--iter", str(RELION_ITER), "--j", str(threads), "--dont_combine_weights_via_disc",
        ]  # fmt: skip
    refs = rdir / "refs.star"
    refs.write_text(
        "\ndata_\n\nloop_\n_rlnReferenceImage #1\n"
        + "".join(f"{(data / f'initial_model_{i + 1:02d}.mrc').resolve()}\n" for i in range(k))
    )
    ini_high = our_config(data, rdir)["initial_lowpass_A"] or start_resolution(data, k, box, px)
    return class3d_args(
        rdir / "run", data / "particles.star", refs, ini_high, k, box, px, threads, seed
    )


def class3d_args(
    out, particles, ref, ini_high: float, k: int, box: int, px: float, threads: int, seed: int
) -> list[str]:
    """RELION's usual class3D command line (see the module docstring) for a fresh start
    from ``ref`` (one map, or a STAR file naming K maps)."""
    return [
        "relion_refine", "--o", str(Path(out).resolve()), "--i", str(Path(particles).resolve()),
        "--ref", str(Path(ref).resolve()), "--firstiter_cc", "--ini_high", str(ini_high),
        "--iter", str(RELION_ITER), "--tau2_fudge", "4", "--particle_diameter", f"{0.75 * box * px:.1f}",
        "--K", str(k), "--flatten_solvent", "--zero_mask", "--oversampling", "1", "--healpix_order", "2",
        "--offset_range", "5", "--offset_step", "2", "--sym", "C1", "--norm", "--scale", "--ctf",
        "--j", str(threads), "--pad", "2", "--dont_combine_weights_via_disc", "--pool", "3",
        "--random_seed", str(seed), "--dont_check_norm",
    ]  # fmt: skip


def start_resolution(data: Path, k: int, box: int, px: float) -> float:
    """Our default start resolution for these initial models (RELION gets the same)."""
    from hetrefine.io.mrc import read_volume
    from hetrefine.schedule import start_resolution_for_maps

    maps = [read_volume(data / f"initial_model_{i + 1:02d}.mrc") for i in range(k)]
    return round(start_resolution_for_maps(maps, box, px, px), 1)


def relion_worker(which: str, seed: int, threads: int) -> dict:
    """Run (or resume) RELION to iteration 25, then evaluate and write the cache."""
    data = simulate(which, seed)
    rdir = relion_dir(which, seed)
    rdir.mkdir(parents=True, exist_ok=True)
    seg_file = rdir / "segments.json"
    segments = json.loads(seg_file.read_text()) if seg_file.exists() else []
    final = rdir / f"run_it{RELION_ITER:03d}_data.star"
    while not final.exists():
        cmd = relion_command(data, rdir, threads, seed)
        print("RELION:", " ".join(cmd), flush=True)
        # image names in particles.star are relative to the data folder: RELION reads them from its cwd
        m = run_child(cmd, thread_env(threads), data, rdir / "relion.log")
        m["command"] = cmd
        m["threads"] = threads
        segments.append(m)
        seg_file.write_text(json.dumps(segments, indent=1))
        if m["returncode"] != 0:
            sys.exit(f"relion_refine failed (rc {m['returncode']}); see {rdir / 'relion.log'}")
    tot = {key: sum(s[key] for s in segments) for key in ("wall_s", "user_s", "sys_s", "cpu_s")}
    res = {
        "program": "relion_refine 3.1 (class3D)",
        "set": which,
        "seed": seed,
        # a resumed run may have segments at different thread counts; CPU s is the comparable figure
        "threads": "+".join(
            str(t) for t in dict.fromkeys(s.get("threads", threads) for s in segments)
        ),
        "iterations": RELION_ITER,
        **tot,
        "max_rss_mib": max(s["max_rss_mib"] for s in segments if s.get("max_rss_mib") is not None),
        "segments": len(segments),
        "command": next((s["command"] for s in segments if s.get("command")), None),
        **evaluate(
            data,
            final,
            [
                rdir / f"run_it{RELION_ITER:03d}_class{i + 1:03d}.mrc"
                for i in range(SETS[which]["n_classes"])
            ],
        ),
    }
    relion_cache(which, seed).write_text(json.dumps(res, indent=1))
    return res


def start_relion_background(which: str, seed: int, threads: int) -> None:
    rdir = relion_dir(which, seed)
    rdir.mkdir(parents=True, exist_ok=True)
    log = rdir / "worker.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--set", which, "--seed", str(seed),
           "--threads", str(threads), "--relion-worker"]  # fmt: skip
    with open(log, "ab") as fh:
        p = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT
        )
    (rdir / "worker.pid").write_text(str(p.pid))
    print(f"RELION started in the background: pid {p.pid}, log {log}")


# ----------------------------------------------------------------------------- report


def fmt_row(r: dict | None, label: str) -> list[str]:
    if r is None:
        return [label] + ["-"] * 9
    res05 = "/".join(f"{c['fsc05_A']:.1f}" for c in r["per_class"])
    res0143 = "/".join(f"{c['fsc0143_A']:.1f}" for c in r["per_class"])
    return [
        label,
        f"{100 * r['accuracy']:.1f}",
        res05,
        res0143,
        f"{r['wall_s']:.0f}",
        f"{r['cpu_s']:.0f}",
        f"{r['cpu_s'] / max(r['wall_s'], 1e-9):.2f}",
        f"{r['max_rss_mib']:.0f}",
        "/".join(str(s) for s in r["class_sizes"]),
        str(r["threads"]),
    ]


def print_table(rows: list[list[str]]) -> None:
    head = [
        "program",
        "acc %",
        "FSC0.5 A",
        "FSC0.143 A",
        "wall s",
        "CPU s",
        "CPU/wall",
        "RSS MiB",
        "sizes",
        "thr",
    ]
    allrows = [head] + rows
    w = [max(len(r[i]) for r in allrows) for i in range(len(head))]
    for r in allrows:
        print("  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(r)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", choices=sorted(SETS), default="a")
    ap.add_argument(
        "--seed", type=int, default=0, help="simulation seed (also RELION's --random_seed)"
    )
    ap.add_argument("--threads", type=int, default=1, help="threads for both programs")
    ap.add_argument(
        "--relion",
        choices=["run", "background", "cached", "skip"],
        default="run",
        help="run: use the cache or run RELION now (about an hour); background: start it detached; "
        "cached: only print a cached result; skip: ours alone",
    )
    ap.add_argument("--ours", choices=["run", "cached", "skip"], default="run")
    ap.add_argument("--relion-worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if a.relion_worker:
        print(json.dumps(relion_worker(a.set, a.seed, a.threads), indent=1))
        return
    s = SETS[a.set]
    print(
        f"set {a.set}: {s['n_particles']} particles, box {s['box']}, K {s['n_classes']}, SNR {s['snr']}, "
        f"{PIXEL} A/px, seed {a.seed}, {a.threads} thread(s); machine: {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    simulate(a.set, a.seed)
    relion = None
    if a.relion != "skip":
        cache = relion_cache(a.set, a.seed)
        if cache.exists():
            relion = json.loads(cache.read_text())
            print(f"RELION: cached result {cache}")
        elif a.relion == "background":
            start_relion_background(a.set, a.seed, a.threads)
        elif a.relion == "run":
            relion = relion_worker(a.set, a.seed, a.threads)
        else:
            print(
                f"RELION: no cached result yet ({cache}); progress in {relion_dir(a.set, a.seed)}"
            )
    ours = None
    if a.ours != "skip":
        cache = OUT / f"ours_{a.set}_seed{a.seed}_t{a.threads}.json"
        if a.ours == "cached" and cache.exists():
            ours = json.loads(cache.read_text())
        elif a.ours == "run":
            ours = run_ours(a.set, a.seed, a.threads)
    print()
    rows = []
    if ours:
        rows.append(fmt_row(ours, f"hetrefine ({ours['iterations']} it)"))
    if a.relion != "skip":
        rows.append(fmt_row(relion, f"RELION 3.1 ({RELION_ITER} it)"))
    print_table(rows)
    print(
        "FSC against the truth maps, masked (soft sphere at the particle diameter); per class, truth order."
    )
    if ours and relion:
        print(
            f"RELION / ours: wall x{relion['wall_s'] / ours['wall_s']:.1f}, CPU x{relion['cpu_s'] / ours['cpu_s']:.1f}, "
            f"peak RSS x{relion['max_rss_mib'] / ours['max_rss_mib']:.2f}; accuracy ours - RELION: "
            f"{100 * (ours['accuracy'] - relion['accuracy']):+.1f} points"
        )
        if relion.get("star_in_input_order") is False:
            print("note: RELION's data.star is not in input order; matched by image name")


if __name__ == "__main__":
    main()
