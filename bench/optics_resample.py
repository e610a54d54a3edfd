"""Cost of putting an optics group on the refinement grid at preprocessing: the exact
resampler (hetrefine.optics, two matrix products per image) against the Fourier crop
that a group already on the grid gets. CPU seconds per 1000 images, one thread.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python bench/optics_resample.py
"""

from __future__ import annotations

import time

import numpy as np

from hetrefine.fourier import fourier_resize
from hetrefine.optics import resample_images, resampling_matrix


def cpu(fn, *args) -> float:
    t0 = time.process_time()
    fn(*args)
    return time.process_time() - t0


def main() -> None:
    rng = np.random.default_rng(0)
    print("input box @ A/px -> refine box @ A/px | resample s/1000 | Fourier crop s/1000")
    for n_in, px_in, box, px_ref in (
        (196, 1.24, 128, 1.25),
        (400, 0.83, 128, 1.06),
        (64, 3.0, 48, 4.0),
    ):
        imgs = rng.normal(size=(500, n_in, n_in)).astype(np.float32)
        px_out = px_ref * n_in / box  # the reference group's box is n_in
        t_mat = cpu(resampling_matrix, n_in, px_in, box, px_out)
        mat = resampling_matrix(n_in, px_in, box, px_out)
        t_res = cpu(resample_images, imgs, mat) * 2
        t_crop = cpu(fourier_resize, imgs, box) * 2
        print(
            f"{n_in} @ {px_in} -> {box} @ {px_out:.3f} | {t_res:.2f} | {t_crop:.2f}"
            f" | matrix once: {t_mat:.2f} s"
        )


if __name__ == "__main__":
    main()
