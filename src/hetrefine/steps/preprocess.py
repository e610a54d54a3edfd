"""Step of rule `preprocess`: read and check the particles, Fourier-crop to the
refinement box (optics groups with another pixel size or box: resampled to the
refinement grid, see ``hetrefine.optics``), normalise, split half-sets, write
fixed-size shards.

Memory: one shard of images at a time (the stack is read lazily, in order).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping

import numpy as np
import pandas as pd

from hetrefine import __version__
from hetrefine.ctf import CTF_FIELDS
from hetrefine.errors import InputError
from hetrefine.fourier import fourier_resize, normalize_images
from hetrefine.io import run_files
from hetrefine.io.particle_checks import unused_optics_notes
from hetrefine.io.particles import read_particles
from hetrefine.io.stacks import iter_image_chunks
from hetrefine.mask import particle_diameter
from hetrefine.optics import (
    RefinementGrid,
    group_positions,
    refinement_grid,
    resample_images,
    resampling_matrix,
)
from hetrefine.plan import chunk_size
from hetrefine.validation import (
    check_particles_for_run,
    constant_images,
    constant_images_error,
    half_sets,
)

log = logging.getLogger("hetrefine")


SAMPLE_SIZE = 300
"""Particles in the seeded sample that init uses for grey scale and noise."""

POSE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")


def preprocess(
    particles: str,
    out_info: str,
    out_metadata: str,
    out_sample: str,
    out_chunks: list[str],
    settings: Mapping,
) -> None:
    """Write the run's info, particle metadata, image sample and one file per chunk
    (``out_chunks``, in order: chunk c holds rows c*chunk_size.., ``plan.chunk_size``;
    an align job streams its shard's chunks)."""
    t0 = time.time()
    n_chunks = len(out_chunks)
    table = read_particles(
        particles, pixel_size=settings["pixel_size"], project_dir=settings["project_dir"]
    )
    check_particles_for_run(particles, table, settings["pixel_size"])
    n = len(table)
    size = chunk_size(settings["shard_size"])
    expected = max(1, math.ceil(n / size))
    if expected != n_chunks:
        raise InputError(
            particles,
            f"holds {n} particles, i.e. {expected} chunks of {size}, but the workflow "
            f"planned {n_chunks}; rerun snakemake so it recounts",
        )
    grid = refinement_grid(table, settings["refine_box"])
    in_box, in_px, box, px = grid.input_box, grid.input_pixel_size, grid.box, grid.pixel_size
    if box > in_box:
        raise InputError(
            "config",
            f"refine_box {box} is larger than the particle box {in_box}"
            + (
                " (of the optics group with the coarsest pixel size)"
                if len(grid.groups) > 1
                else ""
            ),
            "refine_box",
        )
    groups = group_positions(table, grid)
    _log_optics(particles, table, grid)
    radius_px = particle_diameter(settings["particle_diameter_A"], box, px) / 2 / px
    seed = int(settings["seed"])

    half, warning = half_sets(table, seed)
    if warning:
        log.warning("%s: %s", particles, warning)
    elif "rlnRandomSubset" in table.columns:
        log.info("half-sets from _rlnRandomSubset")
    ctf = np.stack([table[c].to_numpy(dtype=np.float64) for c in CTF_FIELDS], axis=1)
    has_poses = all(c in table.columns for c in POSE_COLUMNS)
    if has_poses:  # kept for `input_poses: fixed|local`; ignored otherwise
        poses = table[list(POSE_COLUMNS)].to_numpy(dtype=np.float64)
        origins = np.stack(
            [
                table.get(c, pd.Series(0.0, index=table.index)).to_numpy(dtype=np.float64)
                for c in ("rlnOriginXAngst", "rlnOriginYAngst")
            ],
            axis=1,
        )

    # a seeded sample over the whole stack for init (grey scale, noise): independent
    # of the sharding
    sample = np.sort(np.random.default_rng([seed, 2]).permutation(n)[: min(SAMPLE_SIZE, n)])
    sample_imgs = np.zeros((len(sample), box, box), np.float32)
    matrices: dict[int, np.ndarray] = {}  # resampling matrix per group, made once
    blank = []  # rows of constant (e.g. all-zero) images: refused with their count
    for s in range(n_chunks):
        rows = np.arange(s * size, min((s + 1) * size, n))
        sub = table.iloc[rows]
        imgs = np.zeros((len(rows), box, box), dtype=np.float32)
        for gi in np.unique(groups[rows]):
            in_group = np.flatnonzero(groups[rows] == gi)  # positions in the shard
            for pos, chunk in iter_image_chunks(sub.iloc[in_group], 256):
                bad = constant_images(chunk)
                if bad.any():
                    blank.append(rows[in_group[pos[bad]]])
                chunk = _to_refinement_grid(chunk, grid, int(gi), matrices)
                imgs[in_group[pos]] = normalize_images(chunk, radius_px)
        in_shard = (sample >= rows[0]) & (sample <= rows[-1])
        sample_imgs[in_shard] = imgs[sample[in_shard] - rows[0]]
        run_files.write_shard(
            out_chunks[s],
            images=imgs,
            index=rows.astype(np.int64),
            half=half[rows].astype(np.int8),
            ctf=ctf[rows].astype(np.float32),
            euler=poses[rows] if has_poses else None,
            origin_A=origins[rows] if has_poses else None,
            group=groups[rows] if len(grid.groups) > 1 else None,
        )
        log.info("%s", progress_line(s + 1, n_chunks, int(rows[-1]) + 1, n, time.time() - t0))
    if blank:
        raise constant_images_error(particles, table, np.concatenate(blank))
    run_files.write_sample(
        out_sample, sample_imgs, sample.astype(np.int64), ctf[sample].astype(np.float32),
        group=groups[sample] if len(grid.groups) > 1 else None,
    )  # fmt: skip
    run_files.write_metadata(out_metadata, table)
    info = {
        "n_particles": n,
        "n_chunks": n_chunks,
        "box": box,
        "pixel_size": px,
        "input_box": in_box,
        "input_pixel_size": in_px,
        "optics_groups": [
            {"group": g, "box": b, "pixel_size": p}
            for g, b, p in zip(grid.groups, grid.group_boxes, grid.group_pixel_sizes, strict=True)
        ],
        "source": str(particles),
        "hetrefine": __version__,
    }
    run_files.write_info(out_info, info)
    log.info(
        "preprocess: %d particles, box %d -> %d, %.3f -> %.3f A/px, %d chunks (%.1f s)",
        n, in_box, box, in_px, px, n_chunks, time.time() - t0,
    )  # fmt: skip


def progress_line(chunk: int, n_chunks: int, done: int, n: int, seconds: float) -> str:
    """One progress line of preprocess: chunk, particles done, rate and the time left
    at that rate (a 100,000-particle stack is read for minutes: say how far it is)."""
    rate = done / max(seconds, 1e-9)
    left = (n - done) / max(rate, 1e-9)
    return (
        f"chunk {chunk}/{n_chunks}: {done:,} of {n:,} particles ({100.0 * done / n:.0f}%), "
        f"{seconds:.0f} s, {rate:,.0f} particles/s, about {_duration(left)} left"
    )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _to_refinement_grid(
    chunk: np.ndarray, grid: RefinementGrid, gi: int, matrices: dict[int, np.ndarray]
) -> np.ndarray:
    """Images of group position ``gi`` on the refinement grid: Fourier-cropped when the
    group is on the reference grid (as a single group is), else resampled."""
    if grid.is_reference_grid(gi):
        return fourier_resize(chunk, grid.box) if grid.box != grid.input_box else chunk
    if gi not in matrices:
        matrices[gi] = resampling_matrix(
            grid.group_boxes[gi], grid.group_pixel_sizes[gi], grid.box, grid.pixel_size
        )
    return resample_images(chunk, matrices[gi])


def _log_optics(particles: str, table: pd.DataFrame, grid: RefinementGrid) -> None:
    """Say how the optics groups reach the refinement grid, and which optics corrections
    of the file are carried through unused."""
    if len(grid.groups) > 1:
        log.info(
            "%d optics groups (%s); refinement grid: box %d at %.4f A/px (from the group "
            "with the coarsest pixel size, %d px at %.4f A/px); other groups resampled",
            len(grid.groups),
            ", ".join(
                f"{g}: {b} px at {p:g} A"
                for g, b, p in zip(grid.groups, grid.group_boxes, grid.group_pixel_sizes, strict=True)
            ),
            grid.box, grid.pixel_size, grid.input_box, grid.input_pixel_size,
        )  # fmt: skip
    for note in unused_optics_notes(table):
        log.info("%s: %s", particles, note)
