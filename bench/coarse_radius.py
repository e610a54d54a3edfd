"""Class accuracy and search cost against the coarse-search radius.

Simulates 600 particles (box 64, 4 A/px, K = 2, SNR 0.05, seed 11) and aligns
them against the truth maps low-passed to 12 A, with the coarse radius at
``radius_factor / step`` for each factor given; prints the class accuracy from
the coarse evidence and from the local-search score, and the search CPU time.

    python bench/coarse_radius.py --factors 2 2.5 3 4
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from hetrefine.alignment import SearchSettings, search_poses  # noqa: E402
from hetrefine.ctf import CTF_FIELDS  # noqa: E402
from hetrefine.fourier import (  # noqa: E402
    lowpass_volume,  # noqa: E402
    normalize_images,
    rfft2_centered,
)
from hetrefine.io.mrc import read_volume  # noqa: E402
from hetrefine.io.particles import read_particles  # noqa: E402
from hetrefine.io.stacks import read_images  # noqa: E402
from hetrefine.projection import prepare_reference  # noqa: E402
from hetrefine.sampling import so3_grid  # noqa: E402
from hetrefine.simulate import SimulationSpec, simulate_dataset  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--factors", type=float, nargs="+", default=[2.0, 2.5, 3.0, 4.0])
    p.add_argument("--out", default=str(Path(__file__).parent / "out" / "coarse_radius"))
    a = p.parse_args()
    box, n, px, res_a = 64, 600, 4.0, 12.0
    data = Path(a.out)
    if not (data / "spec.json").exists():
        simulate_dataset(SimulationSpec(n_particles=n, box=box, snr=0.05, seed=11), data)
    noise_sd = json.loads((data / "spec.json").read_text())["noise_sd"]
    table = read_particles(data / "particles.star")
    imgs = normalize_images(read_images(table), 0.375 * box)
    ctf = table[list(CTF_FIELDS)].to_numpy(np.float32)
    lab = pd.read_csv(data / "truth.csv")["class"].to_numpy() - 1
    vols = [
        lowpass_volume(read_volume(data / f"truth_class_{k:02d}.mrc")[0] / noise_sd, res_a, px)
        for k in (1, 2)
    ]
    grids = [prepare_reference(v, 2) for v in vols]
    spectra = rfft2_centered(imgs)
    sigma2 = np.ones(box // 2 + 1, np.float32)
    print(
        f"{n} particles, box {box}, SNR 0.05, K 2, references: truth low-passed to {res_a} A, 1 thread"
    )
    print("factor  coarse radius px  acc (coarse evidence)  acc (local score)  search CPU s")
    for f in a.factors:
        st = SearchSettings(box=box, pixel_size=px, res_limit_px=box * px / res_a, radius_factor=f)
        t = time.process_time()
        r = search_poses(spectra, ctf, sigma2, grids, so3_grid(15), st)
        dt = time.process_time() - t
        acc_c = (r.coarse_evidence.argmax(1) == lab).mean()
        acc_l = (r.score.argmax(1) == lab).mean()
        print(f"{f:6.1f}  {st.radius_for_step(15):16.1f}  {acc_c:21.3f}  {acc_l:17.3f}  {dt:12.1f}")


if __name__ == "__main__":
    main()
