"""CPU time of one align job per chunk at box 128, K=4: what the per-job work (references
prepared, rotation and sums grids, masks, read once per job) costs when it is redone for
every chunk of a shard.

    OMP_NUM_THREADS=1 nice -n 10 python bench/align_job_setup.py --out /tmp/align_job

A small synthetic set (``hetrefine.simulate``, 3 chunks of ``plan.chunk_size``
particles at box 128, 4 classes), iteration 1 of the pipeline (prepare_run, then
``steps.align.align_chunks`` on the one shard), timed with ``time.process_time``
(CPU seconds of this process, one BLAS thread). Prints the CPU per chunk.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from hetrefine.config import defaults
from hetrefine.pipeline import prepare_run
from hetrefine.simulate import SimulationSpec, simulate_dataset
from hetrefine.steps import settings_for
from hetrefine.steps.align import align_chunks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="working folder (data cached there)")
    ap.add_argument("--particles", type=int, default=1500)
    ap.add_argument("--box", type=int, default=128)
    ap.add_argument("--classes", type=int, default=4)
    args = ap.parse_args()
    out = Path(args.out)
    data = out / "data"
    if not (data / "particles.star").exists():
        spec = SimulationSpec(
            n_particles=args.particles, n_classes=args.classes, box=args.box,
            pixel_size=1.5, snr=0.05, domain_fraction=0.2, seed=0,
        )  # fmt: skip
        simulate_dataset(spec, data)
    cfg = defaults()
    cfg.update(iterations=1, shard_size=args.particles, device="cpu")
    models = [str(data / f"initial_model_{k + 1:02d}.mrc") for k in range(args.classes)]
    run = prepare_run(str(data / "particles.star"), models, str(out / "run"), cfg)
    chunks = list(run.chunks[0])
    t0, w0 = time.process_time(), time.time()
    align_chunks(
        chunks, run.references(0), run.model(0), run.mask, run.focus_mask, [], 1,
        run.assignments(1, 0), run.sums(1, 0), settings_for("align", cfg), "cpu",
    )  # fmt: skip
    cpu, wall = time.process_time() - t0, time.time() - w0
    print(
        f"box {args.box}, K={args.classes}, {args.particles} particles in {len(chunks)} chunks: "
        f"align CPU {cpu:.1f} s ({cpu / len(chunks):.1f} s per chunk), wall {wall:.1f} s"
    )


if __name__ == "__main__":
    main()
