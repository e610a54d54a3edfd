"""A whole refinement timed step by step: simulated data, the one-process driver, CPU or GPU.

    python bench/whole_run.py --n 50000 --box 128 --classes 4 --device gpu --shard-size 5000
    python bench/whole_run.py --n 2000 --box 64 --classes 2 --device cpu --iterations 4

Simulates ``--n`` particles (``hetrefine.simulate``, SNR ``--snr``, the particle of
the benchmarks: box 64 at 4 A/px, box 128 at 2 A/px), then runs
``hetrefine.pipeline.run_pipeline`` (the same step functions the workflow's jobs
call, one after the other in this process) and times every step call (wall
seconds; on a GPU after a device synchronise). Prints and writes (``--json``,
rewritten after every step so a run cut short still leaves its figures): the
time of each step summed per iteration, the class accuracy against the truth
after the last iteration, and the per-particle rate of the full-EM iterations
(those after ``online_em_iterations``), from which a projection to more
particles is printed (labelled as such: the measured rate times N, plus the
measured fixed cost of the online-EM iterations and the reconstructs).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="particles")
    ap.add_argument("--box", type=int, default=64, help="particle and refinement box (px)")
    ap.add_argument("--classes", type=int, default=2)
    ap.add_argument("--snr", type=float, default=0.05)
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--shard-size", type=int, default=500)
    ap.add_argument("--device", choices=["cpu", "gpu", "auto"], default="auto")
    ap.add_argument("--out", type=Path, default=Path("bench/out/whole_run"))
    ap.add_argument("--json", type=Path, default=None, help="figures written here after every step")
    ap.add_argument(
        "--project", type=int, nargs="*", default=[500000], help="particle counts to project to"
    )
    ap.add_argument("--no-final", action="store_true", help="skip the final per-class outputs")
    return ap.parse_args()


def _sync() -> None:
    from hetrefine.backend import cupy_available

    if cupy_available():
        import cupy

        cupy.cuda.Device().synchronize()


def main() -> None:
    args = parse()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    from hetrefine import pipeline
    from hetrefine.config import defaults
    from hetrefine.simulate import SimulationSpec, simulate_dataset

    px = 4.0 * 64 / args.box
    data = args.out / f"data_n{args.n}_b{args.box}_k{args.classes}"
    record: dict = {
        "n": args.n,
        "box": args.box,
        "classes": args.classes,
        "snr": args.snr,
        "iterations": args.iterations,
        "shard_size": args.shard_size,
        "device": args.device,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "steps": [],
    }
    try:
        from hetrefine.backend import cupy_available

        if args.device != "cpu" and cupy_available():
            import cupy

            record["gpu"] = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    except Exception as exc:  # pragma: no cover - machine dependent
        record["gpu_error"] = repr(exc)
    record["cpus"] = os.cpu_count()

    def save() -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(record, indent=1))

    t0 = time.perf_counter()
    if not (data / "particles.star").exists():
        simulate_dataset(
            SimulationSpec(
                n_particles=args.n,
                n_classes=args.classes,
                box=args.box,
                pixel_size=px,
                snr=args.snr,
                seed=0,
            ),
            data,
        )
    record["simulate_s"] = time.perf_counter() - t0
    save()

    def timed(name, fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            it = next((x for x in a if isinstance(x, int) and not isinstance(x, bool)), None)
            t = time.perf_counter()
            out = fn(*a, **k)
            _sync()
            dt = time.perf_counter() - t
            record["steps"].append(
                {
                    "step": name,
                    "iteration": it if name in ("align_chunks", "reconstruct") else None,
                    "s": dt,
                }
            )
            save()
            print(f"{name:16s} it={it!s:5s} {dt:8.2f} s", flush=True)
            return out

        return wrapper

    for name in (
        "preprocess",
        "make_mask",
        "init_references",
        "align_chunks",
        "reconstruct",
        "hard_sums",
        "write_classes",
    ):
        setattr(pipeline, name, timed(name, getattr(pipeline, name)))

    cfg = defaults()
    cfg.update(iterations=args.iterations, shard_size=args.shard_size, device=args.device)
    run_dir = args.out / f"run_n{args.n}_b{args.box}_k{args.classes}_{args.device}"
    t1 = time.perf_counter()
    paths = pipeline.run_pipeline(
        str(data / "particles.star"),
        sorted(str(p) for p in data.glob("initial_model_*.mrc")),
        str(run_dir),
        cfg,
        final_outputs=not args.no_final,
    )
    record["pipeline_s"] = time.perf_counter() - t1

    import pandas as pd

    from hetrefine.classification import half_b_order, relabel_half_b
    from hetrefine.io import run_files

    truth = pd.read_csv(data / "truth.csv")
    idx, cls = [], []
    order = half_b_order(run_files.read_model(paths.model(args.iterations)))
    for p in paths.all_assignments(args.iterations):
        d = relabel_half_b(run_files.read_assignments(p), order)  # half B as matched to A
        idx.append(d["index"])
        cls.append(d["posterior"].argmax(1) + 1)
    idx, cls = np.concatenate(idx), np.concatenate(cls)
    lab = truth["class"].to_numpy()[idx]
    good = lab > 0
    record["accuracy"] = float(np.mean(cls[good] == lab[good]))

    per_it: dict[int, float] = {}
    for s in record["steps"]:
        if s["iteration"] is not None:
            per_it[s["iteration"]] = per_it.get(s["iteration"], 0.0) + s["s"]
    record["per_iteration_s"] = per_it
    fixed = sum(
        s["s"]
        for s in record["steps"]
        if s["iteration"] is None and s["step"] not in ("preprocess", "hard_sums", "write_classes")
    )
    n_online = int(cfg["online_em_iterations"])
    full = [per_it[i] for i in per_it if i > n_online]
    online = sum(per_it[i] for i in per_it if i <= n_online)
    pre = sum(s["s"] for s in record["steps"] if s["step"] == "preprocess")
    final = sum(s["s"] for s in record["steps"] if s["step"] in ("hard_sums", "write_classes"))
    print(
        f"\n{args.n} particles, box {args.box}, K={args.classes}, device {record.get('gpu', args.device)}"
    )
    print(
        f"accuracy {record['accuracy']:.4f}; pipeline {record['pipeline_s']:.1f} s wall "
        f"(preprocess {pre:.1f}, init {fixed:.1f}, online EM {online:.1f}, final {final:.1f})"
    )
    for i in sorted(per_it):
        print(f"  iteration {i}: {per_it[i]:.1f} s")
    if full:
        rate = float(np.mean(full)) / args.n
        record["full_em_s_per_particle"] = rate
        proj = {}
        for n_p in args.project:
            f = n_p / args.n
            t = fixed + online + f * (pre + final) + rate * n_p * (args.iterations - n_online)
            proj[n_p] = t
            print(
                f"projection (measured rates x N, not measured): {n_p} particles, {args.iterations} "
                f"iterations: {t / 60:.1f} min"
            )
        record["projection_s"] = proj
    save()


if __name__ == "__main__":
    sys.exit(main())
