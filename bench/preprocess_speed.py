"""Preprocess at size: particles per second reading a box-256 stack into the refinement box.

    python bench/preprocess_speed.py                       # 4,000 particles, box 256 -> 128
    python bench/preprocess_speed.py --n 10000 --box 320 --refine-box 128

Writes a stack of ``--n`` images of ``--box`` px (Gaussian noise with a faint disc:
what preprocess does costs the same whatever the images hold) into one MRC stack,
written through a memory map in blocks so the writer never holds the stack, and a
RELION 3.1 STAR file with CTF columns; then runs the preprocess step
(``hetrefine.steps.preprocess``: read in order, check, Fourier-crop to the refinement
box, normalise, write the chunks) in a child process with one BLAS thread. Prints wall
and CPU seconds, particles per second, the child's peak RSS, the bytes read and written,
(the child's own VmHWM: ``ru_maxrss`` would carry the parent's, which wrote the stack,
across the fork) and the time projected for 100,000 and 1,000,000 particles at that rate (preprocess is
one pass, linear in N, with memory bounded by a chunk: the peak RSS is the check).
The stack goes to ``--workdir`` (default a temporary folder, removed after).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mrcfile
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, logging
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
from hetrefine.config import defaults
from hetrefine.io.run_files import RunLayout
from hetrefine.plan import chunk_size
from hetrefine.steps import settings_for
from hetrefine.steps.preprocess import preprocess
a = json.loads(sys.argv[1])
cfg = defaults()
cfg.update(refine_box=a["refine_box"], shard_size="auto")
n_chunks = -(-a["n"] // chunk_size("auto"))
L = RunLayout(a["run"])
preprocess(a["star"], L.info, L.metadata, L.sample, [L.chunk(c) for c in range(n_chunks)],
           settings_for("preprocess", cfg))
hwm = [l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print("HWM_KB", hwm)
"""


def write_data(folder: Path, n: int, box: int, px: float, seed: int = 0) -> Path:
    """``n`` noise images (with a faint disc) in one stack, and their STAR file."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:box, :box] - box / 2
    disc = (np.hypot(xx, yy) < box / 4).astype(np.float32) * 0.3
    stack = folder / "particles.mrcs"
    with mrcfile.new_mmap(str(stack), shape=(n, box, box), mrc_mode=2, overwrite=True) as m:
        m.set_image_stack()
        m.voxel_size = px
        for i in range(0, n, 1000):
            j = min(n, i + 1000)
            m.data[i:j] = rng.standard_normal((j - i, box, box), dtype=np.float32) + disc
    defocus = rng.uniform(8000, 25000, n)
    rows = "\n".join(
        f"{i + 1:06d}@particles.mrcs {d:.1f} {d - 300:.1f} 30.0 1 {1 + i % 2}"
        for i, d in enumerate(defocus)
    )
    star = folder / "particles.star"
    star.write_text(
        "data_optics\n\nloop_\n_rlnOpticsGroup #1\n_rlnOpticsGroupName #2\n"
        "_rlnVoltage #3\n_rlnSphericalAberration #4\n_rlnAmplitudeContrast #5\n"
        f"_rlnImagePixelSize #6\n_rlnImageSize #7\n_rlnImageDimensionality #8\n"
        f"1 opticsGroup1 300 2.7 0.1 {px} {box} 2\n\n"
        "data_particles\n\nloop_\n_rlnImageName #1\n_rlnDefocusU #2\n_rlnDefocusV #3\n"
        "_rlnDefocusAngle #4\n_rlnOpticsGroup #5\n_rlnRandomSubset #6\n" + rows + "\n"
    )
    return star


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--box", type=int, default=256)
    ap.add_argument("--refine-box", type=int, default=128)
    ap.add_argument("--pixel-size", type=float, default=1.0)
    ap.add_argument("--workdir", type=Path, default=None)
    a = ap.parse_args()
    work = a.workdir or Path(tempfile.mkdtemp(prefix="hr-preprocess-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t = time.time()
        star = write_data(work, a.n, a.box, a.pixel_size)
        stack_bytes = (work / "particles.mrcs").stat().st_size
        print(
            f"wrote {a.n:,} images of {a.box} px ({stack_bytes / 2**30:.2f} GiB) in {time.time() - t:.0f} s"
        )
        arg = {"n": a.n, "refine_box": a.refine_box, "star": str(star), "run": str(work / "run")}
        env = dict(
            os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src")
        )
        t0 = time.time()
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, json.dumps(arg)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        hwm_kb = int(proc.stdout.read().split("HWM_KB")[-1].split()[0] or 0)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.time() - t0
        if status != 0:
            sys.exit(f"preprocess failed (status {status})")
        cpu = ru.ru_utime + ru.ru_stime
        out_bytes = sum(p.stat().st_size for p in (work / "run").rglob("*") if p.is_file())
        rate = a.n / wall
        print(
            f"preprocess {a.n:,} particles, box {a.box} -> {a.refine_box}: wall {wall:.1f} s, "
            f"CPU {cpu:.1f} s, {rate:,.0f} particles/s, peak RSS {hwm_kb / 1024:.0f} MiB, "
            f"read {stack_bytes / 2**30:.2f} GiB, wrote {out_bytes / 2**30:.2f} GiB"
        )
        for n in (100_000, 1_000_000):
            print(
                f"projected for {n:,} particles at this rate: {n / rate / 60:.1f} min (one process)"
            )
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
