"""The pre-flight's measurement: the align and reconstruct steps timed on a small
sample of the real particles (or of simulated ones while the demo data do not
exist yet), in a subprocess capped like an align job, scaled by the pre-flight to
one full-EM iteration on this machine."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from hetrefine.errors import InputError
from hetrefine.plan import ALIGN_THREADS


def _sample_shard(
    config, work, table, box, in_box, n_take: int, tmp: Path
) -> tuple[np.ndarray, ...]:
    """Images (n, D, D) float32 normalised at the refinement box, CTF (n, 8), half (n,)."""
    from hetrefine.ctf import CTF_FIELDS
    from hetrefine.fourier import fourier_resize, normalize_images
    from hetrefine.mask import particle_diameter

    if table is None:  # the demo data do not exist yet: simulate a few of them
        from hetrefine.io.particles import read_particles
        from hetrefine.simulate import SimulationSpec, simulate_dataset

        d = config["demo"]
        spec = SimulationSpec(
            n_particles=n_take,
            n_classes=int(d["n_classes"]),
            box=int(d["box"]),
            pixel_size=float(d["pixel_size"]),
            snr=float(d["snr"]),
            domain_fraction=float(d["domain_fraction"]),
            seed=int(d["seed"]),
            decoy=bool(d["decoy"]),
        )
        simulate_dataset(spec, tmp / "sim")
        table = read_particles(tmp / "sim" / "particles.star")
    n_take = min(n_take, len(table))
    sub = table.iloc[:n_take]
    from hetrefine.io.stacks import read_images

    imgs = read_images(sub)
    if box != in_box:
        imgs = fourier_resize(imgs, box)
    px_in = float(table["rlnImagePixelSize"].iloc[0])
    px = px_in * in_box / box
    imgs = normalize_images(
        imgs, particle_diameter(config["particle_diameter_A"], box, px) / 2 / px
    )
    ctf = np.stack([sub[c].to_numpy(dtype=np.float64) for c in CTF_FIELDS], axis=1)
    half = (np.arange(n_take) % 2).astype(np.int8)
    return imgs.astype(np.float32), ctf.astype(np.float32), half, table


def measure_sample(config, work, table, models, box, px, in_box, sample, cores) -> dict:
    """Time ``steps.align_shard`` on ``sample`` and ``3 * sample`` particles and
    ``steps.reconstruct`` once, in a subprocess capped like an align job's threads.

    The references are the initial models put through ``steps.init_references``
    (the workflow's own path), with the resolution limit set to the highest the
    run will use (late iterations). Returns fixed and per-particle align seconds,
    the reconstruct seconds, the sample's peak RSS and the grey scales found.
    """
    from hetrefine.io import run_files
    from hetrefine.schedule import resolution_limit_px
    from hetrefine.steps import settings_for
    from hetrefine.steps.init_references import init_references
    from hetrefine.steps.mask import make_mask

    n_small, n_large = sample, 3 * sample
    with tempfile.TemporaryDirectory(prefix="hetrefine-preflight-") as tmpdir:
        tmp = Path(tmpdir)
        imgs, ctf, half, table = _sample_shard(config, work, table, box, in_box, n_large, tmp)
        n_large = len(imgs)
        n_small = min(n_small, max(1, n_large // 3))
        pre = tmp / "preprocess"
        pre.mkdir()
        in_px = float(table["rlnImagePixelSize"].iloc[0])
        info = {
            "n_particles": n_large,
            "n_chunks": 1,
            "box": box,
            "pixel_size": px,
            "input_box": in_box,
            "input_pixel_size": in_px,
        }
        (pre / "info.json").write_text(json.dumps(info))
        for name, n in (("small", n_small), ("large", n_large)):
            run_files.write_shard(
                pre / f"shard_{name}.npz", imgs[:n], np.arange(n, dtype=np.int64), half[:n], ctf[:n]
            )
        conf = dict(config)
        conf["online_em_iterations"] = 0
        model_paths = [str(work / p) for p in config["initial_models"]]
        if any(m is None for m in models):  # demo models: from the simulated sample
            sim = tmp / "sim"
            model_paths = [str(sim / f"initial_model_{i + 1:02d}.mrc") for i in range(len(models))]
        make_mask(
            str(pre / "info.json"), str(tmp / "mask.mrc"), str(tmp / "mask_focus.mrc"),
            model_paths, settings_for("mask", conf),
        )  # fmt: skip
        init_references(
            model_paths,
            str(pre / "info.json"),
            str(pre / "shard_large.npz"),
            str(tmp / "mask.mrc"),
            str(tmp / "refs.npz"),
            str(tmp / "model.json"),
            settings_for("init_references", conf),
        )
        model = json.loads((tmp / "model.json").read_text())
        model["res_limit_px"] = resolution_limit_px(box / 2, box, px, conf["max_resolution_A"])
        model["n_particles"] = n_large
        (tmp / "model.json").write_text(json.dumps(model))
        (tmp / "config.json").write_text(json.dumps(conf))
        threads = min(ALIGN_THREADS, cores)
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "hetrefine.step_timing", str(tmp)],
            env=env,
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise InputError("sample run", "align failed on the sample:\n" + proc.stderr[-3000:])
        t = json.loads(proc.stdout.strip().splitlines()[-1])
    per = max((t["t_large"] - t["t_small"]) / max(n_large - n_small, 1), 0.0)
    fixed = max(t["t_small"] - per * n_small, 0.0)
    startup = max(wall - t["t_total"], 0.0)  # interpreter start and imports, once per job
    return {
        "n_small": n_small,
        "n_large": n_large,
        "t_small": t["t_small"],
        "t_large": t["t_large"],
        "per_particle_s": per,
        "fixed_s": fixed,
        "startup_s": startup,
        "reconstruct_s": t["t_reconstruct"] + startup,
        "peak_rss_bytes": t["peak_rss_bytes"],
        "device": t["device"],
        "grey_scales": model.get("grey_scales", []),
    }


def measure_in_subprocess(tmp: Path) -> dict:
    """The timed part of :func:`measure_sample` (run in a fresh process)."""
    import logging
    import resource

    from hetrefine.backend import select_device
    from hetrefine.steps import settings_for
    from hetrefine.steps.align import align_shard
    from hetrefine.steps.reconstruct import reconstruct

    t_start = time.perf_counter()
    logging.disable(logging.INFO)
    conf = json.loads((tmp / "config.json").read_text())
    xp = select_device(conf.get("device", "auto"))
    device = "gpu" if xp.__name__ == "cupy" else "cpu"
    late = int(conf["iterations"])  # the last iteration: sharp posteriors, full EM
    times: dict[str, float] = {}
    # each size twice, the faster run kept (the first call also warms caches and FFT plans)
    for name in ("small", "large", "small", "large"):
        t0 = time.perf_counter()
        align_shard(
            str(tmp / "preprocess" / f"shard_{name}.npz"),
            str(tmp / "refs.npz"),
            str(tmp / "model.json"),
            str(tmp / "mask.mrc"),
            str(tmp / "mask_focus.mrc"),
            late,
            str(tmp / f"assign_{name}.npz"),
            str(tmp / f"sums_{name}.npz"),
            settings_for("align", conf),
            conf.get("device", "auto"),
        )
        times[name] = min(times.get(name, math.inf), time.perf_counter() - t0)
    t0 = time.perf_counter()
    reconstruct(
        [str(tmp / "assign_large.npz")],
        [str(tmp / "sums_large.npz")],
        str(tmp / "model.json"),
        str(tmp / "refs.npz"),
        [],
        str(tmp / "mask.mrc"),
        late,
        str(tmp / "out_refs.npz"),
        str(tmp / "out_model.json"),
        settings_for("reconstruct", conf),
    )
    t_rec = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "t_small": times["small"],
        "t_large": times["large"],
        "t_reconstruct": t_rec,
        "t_total": time.perf_counter() - t_start,
        "peak_rss_bytes": rss,
        "device": device,
    }


if __name__ == "__main__":  # the subprocess of measure_sample
    print(json.dumps(measure_in_subprocess(Path(sys.argv[1]))))
