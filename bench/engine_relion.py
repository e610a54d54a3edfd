"""RELION 3.1 class3D on the Engine II sets (`bench/engine_sets.py`), for the side-by-side.

    python bench/engine_relion.py --set adk2_snr005 --relion background        # start, return at once
    python bench/engine_relion.py --set adk2_snr005 --start one_map --relion background
    python bench/engine_relion.py --set adk2_snr005 --relion cached            # print the cached result
    python bench/engine_relion.py --set adk2_snr005 --relion run               # run in this process

The sets are the ones `bench/engine_sets.py` builds (cached, seeded) from the atomic
models, read from the same ``particles.star``. RELION gets the settings of
``bench/compare_relion.py`` (25 iterations, healpix order 2, tau2_fudge 4, CTF,
particle diameter 0.75 x box x pixel, flatten solvent + zero mask, offset range 5 /
step 2 px, norm and scale correction, ``--firstiter_cc``, ``--ini_high`` = the start
resolution our default derives for these maps, one thread). Starts:

- ``truth``: the same K initial models ours gets (the truth maps low-passed to 30 A;
  with a decoy set, the decoy blob too);
- ``one_map``: RELION's usual class3D start, one reference (the consensus map
  `engine_sets.one_map_start` writes) and ``--K`` classes: RELION splits the particles
  into random subsets in its first iteration.

About an hour of CPU per 2,000 particles on one core, so it runs detached at low
priority and resumes (``--continue`` from its newest ``run_itNNN_optimiser.star``;
every segment's CPU and wall time are added). The result, with the same metrics as
ours (accuracy under the best permutation, per-class FSC 0.5 vs truth, calibration,
pose errors, junk caught), is cached in
``bench/out/engine_sets/<set>_seed<seed>/relion_<start>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from compare_relion import class3d_args, run_child, thread_env  # noqa: E402
from engine_sets import OUT, build, evaluate, extra_metrics, one_map_start, oracle  # noqa: E402

RELION_ITER = 25


def relion_dir(name: str, seed: int, start: str) -> Path:
    return OUT / f"{name}_seed{seed}" / f"relion_{start}"


def relion_cache(name: str, seed: int, start: str) -> Path:
    tail = "" if RELION_ITER == 25 else f"_it{RELION_ITER}"
    return OUT / f"{name}_seed{seed}" / f"relion_{start}{tail}.json"


def references(data: Path, start: str) -> tuple[list[Path], int]:
    """The reference maps RELION is given and its number of classes K."""
    spec = json.loads((data / "spec.json").read_text())
    k = spec["n_classes"] + (1 if spec.get("decoy") else 0)
    if start == "one_map":
        return [Path(one_map_start(data, spec["n_classes"])[0])], k
    return [data / f"initial_model_{i + 1:02d}.mrc" for i in range(k)], k


def start_resolution(data: Path, refs: list[Path]) -> float:
    """Our default start resolution for these maps (RELION gets the same ``--ini_high``)."""
    from hetrefine.io.mrc import read_volume
    from hetrefine.schedule import start_resolution_for_maps

    spec = json.loads((data / "spec.json").read_text())
    maps = [read_volume(p) for p in refs]
    return round(
        start_resolution_for_maps(maps, spec["box"], spec["pixel_size"], spec["pixel_size"]), 1
    )


def relion_command(data: Path, rdir: Path, start: str, threads: int, seed: int) -> list[str]:
    """relion_refine class3D: a fresh start, or ``--continue`` from the newest iteration."""
    spec = json.loads((data / "spec.json").read_text())
    box, px = spec["box"], spec["pixel_size"]
    done = sorted(rdir.glob("run_it[0-9][0-9][0-9]_optimiser.star"))
    if done:
        return [
            "relion_refine", "--continue", str(done[-1].resolve()), "--o", str((rdir / "run").resolve()),
            "--iter", str(RELION_ITER), "--j", str(threads), "--dont_combine_weights_via_disc",
        ]  # fmt: skip
    refs, k = references(data, start)
    if len(refs) == 1:
        ref = refs[0]
    else:
        ref = rdir / "refs.star"
        ref.write_text(
            "\ndata_\n\nloop_\n_rlnReferenceImage #1\n" + "".join(f"{p.resolve()}\n" for p in refs)
        )
    ini_high = start_resolution(data, refs)
    cmd = class3d_args(
        rdir / "run", data / "particles.star", ref, ini_high, k, box, px, threads, seed
    )
    cmd[cmd.index("--iter") + 1] = str(RELION_ITER)
    return cmd


def evaluate_iteration(data: Path, rdir: Path, start: str, it: int) -> dict:
    """The bench's metrics (accuracy, FSC vs truth, calibration, poses, junk) of RELION's
    iteration ``it`` in ``rdir``: its ``run_itNNN_data.star`` and class maps."""
    star = rdir / f"run_it{it:03d}_data.star"
    _, k = references(data, start)
    ev = evaluate(data, star, [rdir / f"run_it{it:03d}_class{i + 1:03d}.mrc" for i in range(k)])
    return {**ev, **extra_metrics(data, star, ev["per_class"])}


def relion_worker(name: str, seed: int, start: str, threads: int) -> dict:
    """Run (or resume) RELION to its last iteration, evaluate it, write the cache."""
    data = build(name, seed, None)
    rdir = relion_dir(name, seed, start)
    rdir.mkdir(parents=True, exist_ok=True)
    seg_file = rdir / "segments.json"
    segments = json.loads(seg_file.read_text()) if seg_file.exists() else []
    final = rdir / f"run_it{RELION_ITER:03d}_data.star"
    while not final.exists():
        cmd = relion_command(data, rdir, start, threads, seed)
        print("RELION:", " ".join(cmd), flush=True)
        # image names in particles.star are relative to the data folder: RELION's cwd
        m = run_child(cmd, thread_env(threads), data, rdir / "relion.log")
        m.update(command=cmd, threads=threads)
        segments.append(m)
        seg_file.write_text(json.dumps(segments, indent=1))
        if m["returncode"] != 0:
            sys.exit(f"relion_refine failed (rc {m['returncode']}); see {rdir / 'relion.log'}")
    res = {
        "program": "relion_refine 3.1 (class3D)",
        "set": name,
        "seed": seed,
        "start": start,
        "iterations": RELION_ITER,
        **{key: sum(s[key] for s in segments) for key in ("wall_s", "user_s", "sys_s", "cpu_s")},
        "max_rss_mib": max(s["max_rss_mib"] for s in segments),
        "segments": len(segments),
        "command": segments[0]["command"] if segments else None,
        **evaluate_iteration(data, rdir, start, RELION_ITER),
    }
    relion_cache(name, seed, start).write_text(json.dumps(res, indent=1))
    return res


def interim(name: str, seed: int, start: str) -> None:
    """Evaluate the newest finished iteration of a RELION run (running or stopped); its
    CPU time is the finished segments' plus the running process's (``ps``)."""
    data = build(name, seed, None)
    rdir = relion_dir(name, seed, start)
    done = sorted(rdir.glob("run_it[0-9][0-9][0-9]_data.star"))
    if not done or done[-1].name == "run_it000_data.star":
        sys.exit(f"no finished RELION iteration in {rdir}")
    it = int(done[-1].name[6:9])
    seg_file = rdir / "segments.json"
    cpu = sum(s["cpu_s"] for s in json.loads(seg_file.read_text())) if seg_file.exists() else 0.0
    ps = subprocess.run(["ps", "-eo", "cputimes=,args="], capture_output=True, text=True)
    here = str((rdir / "run").resolve())
    for line in ps.stdout.splitlines():  # this run's relion_refine only
        secs, _, args = line.strip().partition(" ")
        if "relion_refine" in args and here in args:
            cpu += float(secs)
    res = {"set": name, "seed": seed, "start": start, "segments": 0, "cpu_s": cpu, "wall_s": float("nan"),
           **evaluate_iteration(data, rdir, start, it)}  # fmt: skip
    print(f"RELION iteration {it} (interim; CPU so far includes the running iteration):")
    report(res, oracle(data))


def start_background(name: str, seed: int, start: str, threads: int, nice: int) -> None:
    rdir = relion_dir(name, seed, start)
    rdir.mkdir(parents=True, exist_ok=True)
    cmd = ["nice", "-n", str(nice), sys.executable, str(Path(__file__).resolve()), "--set", name,
           "--seed", str(seed), "--start", start, "--threads", str(threads), "--relion", "run",
           "--iterations", str(RELION_ITER)]  # fmt: skip
    with open(rdir / "worker.log", "ab") as fh:
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    (rdir / "worker.pid").write_text(str(p.pid))
    print(f"RELION started in the background: pid {p.pid}, log {rdir / 'worker.log'}")


def report(res: dict, orc: list[dict]) -> None:
    fsc = " / ".join(f"{c['fsc05_A']:.1f}" for c in res["per_class"])
    orac = " / ".join(f"{c['fsc05_A']:.1f}" for c in orc)
    pose = " / ".join(
        f"{v['median_deg']:.1f}" if v["median_deg"] is not None else "-"
        for v in res["pose_error"].values()
    )
    print(
        f"RELION {res['set']} seed {res['seed']} [{res['start']}]: accuracy "
        f"{100 * res['accuracy']:.2f}% (sizes {res['class_sizes']}); FSC0.5 vs truth {fsc} A "
        f"(oracle {orac} A); calibration: expected wrong {res['expected_wrong']:.1f}, observed "
        f"{res['observed_wrong']}; median pose error {pose} deg; CPU {res['cpu_s']:.0f} s, "
        f"wall {res['wall_s']:.0f} s ({res['segments']} segment(s))",
        flush=True,
    )
    for thr, row in res.get("junk", {}).get("by_threshold", {}).items():
        if thr == "decoy":
            print(f"  junk caught by the decoy class: {100 * row['junk_caught']:.1f}%, "
                  f"good lost {100 * row['good_lost']:.2f}%", flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", default="adk2_snr005", help="an engine_sets.py set")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", choices=["truth", "one_map"], default="truth")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--nice", type=int, default=19, help="priority of a background run")
    ap.add_argument(
        "--relion",
        choices=["background", "cached", "run", "interim"],
        default="cached",
        help="interim: evaluate the newest finished iteration of a run still going",
    )
    ap.add_argument(
        "--iterations", type=int, default=25,
        help="RELION's last iteration (class3D has no iteration-dependent schedule, so a "
        "shorter run equals the first N iterations of a 25-iteration one)",
    )  # fmt: skip
    a = ap.parse_args()
    global RELION_ITER
    RELION_ITER = a.iterations
    if a.relion == "background":
        start_background(a.set, a.seed, a.start, a.threads, a.nice)
        return
    if a.relion == "interim":
        interim(a.set, a.seed, a.start)
        return
    cache = relion_cache(a.set, a.seed, a.start)
    if a.relion == "cached":
        if not cache.exists():
            done = sorted(relion_dir(a.set, a.seed, a.start).glob("run_it[0-9]*_optimiser.star"))
            sys.exit(f"no cached RELION result ({cache}); {len(done)} iteration(s) done so far")
        res = json.loads(cache.read_text())
    else:
        os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
        res = relion_worker(a.set, a.seed, a.start, a.threads)
    report(res, oracle(build(a.set, a.seed, None)))


if __name__ == "__main__":
    main()
