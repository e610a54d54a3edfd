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
BASELINE_BYTES = 250 * MB
"""Fixed part of every job: Python + numpy + scipy + the kernel imported (~70 MB RSS),
the compiled CPU kernels loaded (~100 MB, :mod:`hetrefine.kernels`) plus the pose
search's per-batch work arrays (~80 MB); calibrated on measured peak RSS (box 32 to 96,
K 2 to 3: estimates 1.0 to 1.4 x the measured peak before the kernels; a kernel job's
peak was 232 MB before any data)."""

ALIGN_THREADS = 4
"""Most threads one align or hard_sums job uses (most of it is single-threaded numpy)."""

RETRY_FACTOR = 2
"""A retried job asks for this many times the memory of the previous attempt."""

REQUEST_MARGIN = 1.25
"""A job asks for this many times its estimate (+ 256 MB): the estimates are within
1.0-1.4x of measured peaks, and a job killed for memory costs a retry."""


CHUNK_PARTICLES = 500
"""Most particles of one preprocessed chunk file: the unit an align or hard_sums job reads
and aligns at a time (its images, spectra and search arrays are what grows with it), so a
job's memory is bounded by the chunk, the box and K, never by its shard or the run."""

DEFAULT_WORKERS = 4
"""Align jobs per iteration with ``shard_size: auto`` when the profile sets no ``workers``."""

SUMS_FAN_IN = 8
"""Most sums files one job reads: shards' sums are added in a tree of ``reduce_sums`` jobs
of at most this many inputs each, so reconstruct and write_classes read at most this many."""


def chunk_size(shard_size: int | str) -> int:
    """Particles per chunk file: :data:`CHUNK_PARTICLES` for ``auto``; for an explicit
    shard size S, S split into ``ceil(S / CHUNK_PARTICLES)`` equal chunks (S itself when
    S <= CHUNK_PARTICLES, so a shard of that size is one chunk)."""
    if shard_size == "auto":
        return CHUNK_PARTICLES
    s = int(shard_size)
    return math.ceil(s / math.ceil(s / CHUNK_PARTICLES))


def n_chunks(n_particles: int, shard_size: int | str) -> int:
    """Number of chunk files preprocess writes: ``ceil(n_particles / chunk_size)``, at least 1."""
    return max(1, math.ceil(n_particles / chunk_size(shard_size)))


def chunks_per_shard(n_particles: int, shard_size: int | str, workers: int | None = None) -> int:
    """Chunks one align job streams: ``ceil(S / chunk_size)`` for an explicit shard size
    S; for ``auto`` the chunks shared out over ``workers`` jobs (the profile's ``workers``,
    a config value: never the node a job lands on, so every parse of the Snakefile on a
    cluster plans the same shards)."""
    if shard_size == "auto":
        return math.ceil(n_chunks(n_particles, "auto") / max(1, workers or DEFAULT_WORKERS))
    return math.ceil(int(shard_size) / chunk_size(shard_size))


def n_shards(n_particles: int, shard_size: int | str, workers: int | None = None) -> int:
    """Number of shards (align jobs per iteration), at least 1: ``ceil(n / shard_size)``
    for an explicit size (shards of about that size), ``min(workers, chunks)`` for ``auto``."""
    per = chunks_per_shard(n_particles, shard_size, workers)
    return max(1, math.ceil(n_chunks(n_particles, shard_size) / per))


def shard_chunks(
    shard: int, n_particles: int, shard_size: int | str, workers: int | None = None
) -> range:
    """The chunk numbers shard ``shard`` aligns (consecutive rows of the particle table)."""
    per = chunks_per_shard(n_particles, shard_size, workers)
    return range(shard * per, min((shard + 1) * per, n_chunks(n_particles, shard_size)))


def shard_particles(n_particles: int, shard_size: int | str, workers: int | None = None) -> int:
    """Most particles of one shard (for the time estimate; memory follows the chunk)."""
    per = chunks_per_shard(n_particles, shard_size, workers)
    return min(n_particles, per * chunk_size(shard_size))


def reduce_levels(n_leaves: int, fan_in: int = SUMS_FAN_IN) -> list[int]:
    """Files per level of the sums tree above ``n_leaves`` leaf files: level l+1 has
    ``ceil(n_l / fan_in)`` files, up to the first level of at most ``fan_in`` files;
    none when the leaves are few enough (their reader takes them as they are)."""
    levels, n = [], n_leaves
    while n > fan_in:
        n = math.ceil(n / fan_in)
        levels.append(n)
    return levels


def reduce_children(node: int, n_below: int, fan_in: int = SUMS_FAN_IN) -> range:
    """The files of the level below (of ``n_below``) that tree node ``node`` adds."""
    return range(node * fan_in, min((node + 1) * fan_in, n_below))


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
    n_shard: int,
    box: int,
    k_classes: int,
    n_shifts: int,
    n_rots: int,
    batch: int = 64,
    n_results: int = 0,
) -> int:
    """Estimated peak memory (bytes) of one align job.

    n_shard: particles in one chunk (a job streams its shard chunk by chunk, so this,
    not the shard, is what its memory follows); n_results: particles of the whole
    shard, whose per-particle results (posteriors, poses: ~9 K floats each) the job
    gathers; box: refinement box D (px); n_shifts,
    n_rots: coarse-search grid sizes. Terms: the chunk's images at D (float32,
    loaded and the selected copy), their rfft spectra (complex64, D x (D/2+1)),
    K reference grids of (2D+5)^3 complex64 for each half-set (steps.align.AlignJob
    keeps both; an upper bound: the grids hold the sums grid's radius) plus their
    preparation (padded (2D)^3 volume and its complex FFT), the K x 2
    backprojection sums packed on the Hermitian half ball (complex64 + float32)
    and one class's float64/complex128 accumulator with its Friedel completion, the coarse search's per-batch log-likelihood matrix
    (``batch`` x shifts x rotations float32, with ~3 live copies) and its
    shifted-image matrix, plus the 250 MB baseline (:data:`BASELINE_BYTES`).
    Calibrated against measured peak RSS of ``scripts/align.py``
    (``bench/preflight_accuracy.py``).
    """
    d = box
    g3 = (2 * d + 5) ** 3
    images = n_shard * d * d * 4 * 2
    spectra = n_shard * d * (d // 2 + 1) * 8 * 2
    grids = 2 * k_classes * g3 * 8 + (2 * d) ** 3 * (4 + 8 * 3)
    # packed sums (Hermitian half ball, 26% of the cube) + one class's accumulator
    # and its Friedel completion (complex128 + float64, about two live copies)
    sums = k_classes * 2 * g3 * HALF_BALL * (8 + 4) + 2 * g3 * (16 + 8)
    m = min(8.0, d / 2) ** 2 * math.pi / 2  # frequencies of the coarse radius (half plane)
    coarse = 3 * batch * n_shifts * n_rots * 4 + batch * n_shifts * m * 8 * 2
    results = n_results * (k_classes * 9 * 4 + 16)
    return int(BASELINE_BYTES + images + spectra + grids + sums + coarse + results)


def reconstruct_memory_bytes(box: int, k_classes: int) -> int:
    """Estimated peak memory (bytes) of the reconstruct job (gather of every shard).

    The K x 2 summed grids of (2D+5)^3 in float64 (complex128 numerator + float64
    weight) unpacked from the packed sum, one shard's packed sums being added
    (complex64 + float32), a few padded
    (2D)^3 complex FFT volumes for the Wiener/gridding step, the K x 2 output
    half-maps, plus the 250 MB baseline.
    """
    d = box
    g3 = (2 * d + 5) ** 3
    summed = k_classes * 2 * g3 * (16 + 8) * (1 + HALF_BALL)  # unpacked cubes + the packed sum
    one_shard = k_classes * 2 * g3 * HALF_BALL * (8 + 4)
    ffts = 6 * (2 * d) ** 3 * 16
    maps = k_classes * 2 * d**3 * 4 * 2
    return int(BASELINE_BYTES + summed + one_shard + ffts + maps)


def reduce_memory_bytes(box: int, k_classes: int) -> int:
    """Estimated peak memory (bytes) of one ``reduce_sums`` job: the running sum in
    float64/complex128 and the file being added (complex64 + float32), K x 2 packed
    grids of (2D+5)^3 at most (the full-radius bound), plus the 250 MB baseline."""
    packed = k_classes * 2 * (2 * box + 5) ** 3 * HALF_BALL
    return int(BASELINE_BYTES + packed * ((16 + 8) + (8 + 4)))


def sums_file_bytes(box: int, k_classes: int, res_limit_px: float | None = None) -> int:
    """Bytes of one iteration sums file (K classes x 2 half-sets, complex64 numerator +
    float32 weight on the packed half ball) at alignment limit ``res_limit_px`` (box
    pixels; None: the full radius, the largest it gets)."""
    from hetrefine.backprojection import SumsGrid, backprojection_radius

    radius = box / 2 - 1 if res_limit_px is None else backprojection_radius(res_limit_px, box)
    return k_classes * 2 * SumsGrid.create(box, radius).n_packed * (8 + 4)


def iteration_sums_files(n_particles: int, shard_size: int | str, workers: int | None) -> int:
    """Sums files written per iteration: one per shard plus the reduce tree's."""
    shards = n_shards(n_particles, shard_size, workers)
    return shards + sum(reduce_levels(shards))


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
    per shard, the reduce tree's jobs and one reconstruct, one hard_sums per shard and
    its reduce tree, write_classes, plots, all, and simulate_demo for the demo."""
    tree = sum(reduce_levels(n_shards))
    return 3 + iterations * (n_shards + tree + 1) + n_shards + tree + 3 + (1 if demo else 0)


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
