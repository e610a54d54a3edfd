"""Per-optics-group noise spectra vs one pooled spectrum (issue 15 item 6): 400
simulated particles, two classes, half of them recorded at 4.5 A x 40 px with coloured
noise (``noise_colour``), half at 6 A x 32 px with white noise (the two-group set of
``tests/test_optics_groups.py``); 3 iterations each way; class accuracy overall and per
group.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 PYTHONPATH=src python bench/optics_noise_ablation.py 2 /tmp/abl [seed, default 2]
"""

from __future__ import annotations

import glob
import sys
from pathlib import Path

import pandas as pd

from hetrefine import pipeline
from hetrefine.classification import half_b_order, relabel_half_b
from hetrefine.config import defaults
from hetrefine.io import run_files
from hetrefine.simulate import SimulationSpec


def main(colour: float, tmp: Path, seed: int = 2) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_optics_groups import _simulate_two_grids

    tmp.mkdir(parents=True, exist_ok=True)
    spec = SimulationSpec(n_particles=400, snr=0.1, seed=seed, domain_fraction=0.2)
    star = _simulate_two_grids(tmp, spec, colour_b=colour)
    cfg = defaults()
    cfg.update(iterations=3, shard_size=400, particle_diameter_A=150.0)
    truth = pd.read_csv(tmp / "truth.csv")["class"].to_numpy() - 1
    models = sorted(glob.glob(str(tmp / "a" / "initial_model_*.mrc")))
    prepare = pipeline.prepare_run

    def prepare_pooled(*args, **kwargs):  # drop the per-group spectra after init
        run = prepare(*args, **kwargs)
        m = run_files.read_model(run.model(0))
        m.pop("sigma2_groups")
        run_files.write_model(run.model(0), m)
        return run

    for pooled in (False, True):
        pipeline.prepare_run = prepare_pooled if pooled else prepare
        out = str(tmp / f"pooled_{pooled}")
        run = pipeline.run_pipeline(str(star), models, out, cfg, final_outputs=False)
        d = relabel_half_b(  # half B's classes as reconstruct matched them to half A's
            run_files.read_assignments(run.assignments(3, 0)),
            half_b_order(run_files.read_model(run.model(3))),
        )
        ok = d["posterior"].argmax(1) == truth[d["index"]]
        ok = ok if ok.mean() >= 0.5 else ~ok
        even = d["index"] % 2 == 0
        print(
            f"{'pooled' if pooled else 'per group'}: accuracy {ok.mean():.3f}, "
            f"group 1 (white) {ok[even].mean():.3f}, group 2 (coloured) {ok[~even].mean():.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main(float(sys.argv[1]), Path(sys.argv[2]), *(int(a) for a in sys.argv[3:4]))
