"""The plan of a run: shards, jobs, threads, memory and time of each job.

One model, used by the workflow's resource requests (``workflow/rules/common.smk``)
and by the pre-flight check (``hetrefine.preflight``), so what a cluster is asked
for and what the pre-flight prints are the same numbers. Memory of every job is
bounded by the shard size, the box and K, never by the number of particles.
"""

from __future__ import annotations

import math
import os

MB = 2**20
BASELINE_BYTES = 150 * MB
"""Fixed part of every job: Python + numpy + scipy + the kernel imported (~70 MB RSS)
plus the pose search's per-batch work arrays (~80 MB); calibrated on measured peak RSS
(box 32 to 96, K 2 to 3: estimates 1.0 to 1.4 x the measured peak)."""

ALIGN_THREADS = 4
"""Most threads one align or hard_sums job uses (most of it is single-threaded numpy)."""

RETRY_FACTOR = 2
"""A retried job asks for this many times the memory of the previous attempt."""

REQUEST_MARGIN = 1.25
"""A job asks for this many times its estimate (+ 256 MB): the estimates are within
1.0-1.4x of measured peaks, and a job killed for memory costs a retry."""


def n_shards(n_particles: int, shard_size: int) -> int:
    """Number of shards: ``ceil(n_particles / shard_size)``, at least 1."""
    return max(1, math.ceil(n_particles / shard_size))


def shard_threads(cores: int | None, n_shard_jobs: int) -> int:
    """Threads per align/hard_sums job: the shards are the unit of parallelism, so one
    thread each when there are at least as many shards as cores; otherwise the cores
    shared out, at most :data:`ALIGN_THREADS`. ``cores`` None (a cluster executor,
    which sets no --cores): :data:`ALIGN_THREADS` per job (the profile's `cores` /
    `max-threads` cuts it to what a node offers)."""
    if not cores:
        return ALIGN_THREADS
    return max(1, min(ALIGN_THREADS, cores // max(1, n_shard_jobs)))


def n_shift_points(shift_range_px: float, shift_step_px: float) -> int:
    """Number of shifts of the coarse search grid (``sampling.shift_grid``)."""
    from hetrefine.sampling import shift_grid

    return len(shift_grid(shift_range_px, shift_step_px))


def n_rotations(coarse_angle_step_deg: float, symmetry: str = "C1") -> int:
    """Number of rotations of the coarse global grid (after the asymmetric-unit reduction)."""
    from hetrefine.sampling import rotation_grid

    return len(rotation_grid(coarse_angle_step_deg, symmetry))


HALF_BALL = 0.262  # share of the cube in the packed sums (``projection.half_ball_mask``)


def align_memory_bytes(
    n_shard: int, box: int, k_classes: int, n_shifts: int, n_rots: int, batch: int = 64
) -> int:
    """Estimated peak memory (bytes) of one align job.

    n_shard: particles in the shard; box: refinement box D (px); n_shifts,
    n_rots: coarse-search grid sizes. Terms: the shard's images at D (float32,
    loaded and the selected copy), their rfft spectra (complex64, D x (D/2+1)),
    K reference grids of (2D+5)^3 complex64 for the current half-set plus their
    preparation (padded (2D)^3 volume and its complex FFT), the K x 2
    backprojection sums packed on the Hermitian half ball (complex64 + float32)
    and one class's float64/complex128 accumulator with its Friedel completion, the coarse search's per-batch log-likelihood matrix
    (``batch`` x shifts x rotations float32, with ~3 live copies) and its
    shifted-image matrix, plus the 150 MB baseline (:data:`BASELINE_BYTES`).
    Calibrated against measured peak RSS of ``scripts/align.py``
    (``bench/preflight_accuracy.py``).
    """
    d = box
    g3 = (2 * d + 5) ** 3
    images = n_shard * d * d * 4 * 2
    spectra = n_shard * d * (d // 2 + 1) * 8 * 2
    grids = k_classes * g3 * 8 + (2 * d) ** 3 * (4 + 8 * 3)
    # packed sums (Hermitian half ball, 26% of the cube) + one class's accumulator
    # and its Friedel completion (complex128 + float64, about two live copies)
    sums = k_classes * 2 * g3 * HALF_BALL * (8 + 4) + 2 * g3 * (16 + 8)
    m = min(8.0, d / 2) ** 2 * math.pi / 2  # frequencies of the coarse radius (half plane)
    coarse = 3 * batch * n_shifts * n_rots * 4 + batch * n_shifts * m * 8 * 2
    return int(BASELINE_BYTES + images + spectra + grids + sums + coarse)


def reconstruct_memory_bytes(box: int, k_classes: int) -> int:
    """Estimated peak memory (bytes) of the reconstruct job (gather of every shard).

    The K x 2 summed grids of (2D+5)^3 in float64 (complex128 numerator + float64
    weight) unpacked from the packed sum, one shard's packed sums being added
    (complex64 + float32), a few padded
    (2D)^3 complex FFT volumes for the Wiener/gridding step, the K x 2 output
    half-maps, plus the 150 MB baseline.
    """
    d = box
    g3 = (2 * d + 5) ** 3
    summed = k_classes * 2 * g3 * (16 + 8) * (1 + HALF_BALL)  # unpacked cubes + the packed sum
    one_shard = k_classes * 2 * g3 * HALF_BALL * (8 + 4)
    ffts = 6 * (2 * d) ** 3 * 16
    maps = k_classes * 2 * d**3 * 4 * 2
    return int(BASELINE_BYTES + summed + one_shard + ffts + maps)


def available_memory_bytes() -> int:
    """Memory available to new processes on this machine (MemAvailable of /proc/meminfo)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


def fitting_shard_size(
    limit_bytes: int, box: int, k_classes: int, n_shifts: int, n_rots: int
) -> int:
    """Largest shard size whose align estimate fits in ``limit_bytes`` (0 if none does)."""
    fixed = align_memory_bytes(0, box, k_classes, n_shifts, n_rots)
    per = align_memory_bytes(1, box, k_classes, n_shifts, n_rots) - fixed
    if limit_bytes <= fixed:
        return 0
    return int((limit_bytes - fixed) // max(per, 1))


def total_jobs(n_shards: int, iterations: int, demo: bool) -> int:
    """Jobs of a whole run (``rule all``): preprocess, mask, init, per iteration one align
    per shard and one reconstruct, one hard_sums per shard, write_classes, plots, all,
    and simulate_demo for the demo."""
    return 3 + iterations * (n_shards + 1) + n_shards + 3 + (1 if demo else 0)


def memory_mb(n_bytes: int, attempt: int = 1) -> int:
    """A job's memory request in MiB for an estimate in bytes, grown on each retry."""
    return int(math.ceil(REQUEST_MARGIN * n_bytes / MB) + 256) * RETRY_FACTOR ** (
        max(1, attempt) - 1
    )


def preprocess_memory_bytes(n_shard: int, input_box: int, box: int) -> int:
    """One shard of input images at the input box, its Fourier-cropped copy, and the
    chunk being read (float32, with numpy temporaries)."""
    return int(BASELINE_BYTES + n_shard * (input_box**2 * 4 * 3 + box**2 * 4 * 2))


def small_memory_bytes(box: int, k_classes: int) -> int:
    """Mask, plots and other jobs that hold a few maps per class."""
    return int(BASELINE_BYTES + k_classes * 2 * box**3 * 4 * 4)
