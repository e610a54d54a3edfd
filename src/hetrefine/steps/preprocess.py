"""Step of rule `preprocess`: read and check the particles, Fourier-crop to the
refinement box, normalise, split half-sets, write fixed-size shards.

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
from hetrefine.io.particles import read_particles
from hetrefine.io.stacks import iter_image_chunks
from hetrefine.mask import particle_diameter
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
    out_shards: list[str],
    settings: Mapping,
) -> None:
    """Write the run's info, particle metadata, image sample and one file per shard
    (``out_shards``, in order: shard s holds rows s*shard_size..)."""
    t0 = time.time()
    n_shards = len(out_shards)
    table = read_particles(
        particles, pixel_size=settings["pixel_size"], project_dir=settings["project_dir"]
    )
    check_particles_for_run(particles, table, settings["pixel_size"])
    n = len(table)
    shard_size = int(settings["shard_size"])
    expected = max(1, math.ceil(n / shard_size))
    if expected != n_shards:
        raise InputError(
            particles,
            f"holds {n} particles, i.e. {expected} shards of {shard_size}, but the workflow "
            f"planned {n_shards}; rerun snakemake so it recounts",
        )
    in_box = int(table["rlnImageSize"].iloc[0])
    in_px = float(table["rlnImagePixelSize"].iloc[0])
    box = int(settings["refine_box"] or in_box)
    if box > in_box:
        raise InputError(
            "config", f"refine_box {box} is larger than the particle box {in_box}", "refine_box"
        )
    px = in_px * in_box / box
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
    blank = []  # rows of constant (e.g. all-zero) images: refused with their count
    for s in range(n_shards):
        rows = np.arange(s * shard_size, min((s + 1) * shard_size, n))
        sub = table.iloc[rows]
        imgs = np.zeros((len(rows), box, box), dtype=np.float32)
        for pos, chunk in iter_image_chunks(sub, 256):
            bad = constant_images(chunk)
            if bad.any():
                blank.append(rows[pos[bad]])
            chunk = fourier_resize(chunk, box) if box != in_box else chunk
            imgs[pos] = normalize_images(chunk, radius_px)
        in_shard = (sample >= rows[0]) & (sample <= rows[-1])
        sample_imgs[in_shard] = imgs[sample[in_shard] - rows[0]]
        run_files.write_shard(
            out_shards[s],
            images=imgs,
            index=rows.astype(np.int64),
            half=half[rows].astype(np.int8),
            ctf=ctf[rows].astype(np.float32),
            euler=poses[rows] if has_poses else None,
            origin_A=origins[rows] if has_poses else None,
        )
        log.info("shard %d/%d: %d particles", s + 1, n_shards, len(rows))
    if blank:
        raise constant_images_error(particles, table, np.concatenate(blank))
    run_files.write_sample(
        out_sample, sample_imgs, sample.astype(np.int64), ctf[sample].astype(np.float32)
    )
    run_files.write_metadata(out_metadata, table)
    info = {
        "n_particles": n,
        "n_shards": n_shards,
        "box": box,
        "pixel_size": px,
        "input_box": in_box,
        "input_pixel_size": in_px,
        "source": str(particles),
        "hetrefine": __version__,
    }
    run_files.write_info(out_info, info)
    log.info(
        "preprocess: %d particles, box %d -> %d, %.3f -> %.3f A/px, %d shards (%.1f s)",
        n, in_box, box, in_px, px, n_shards, time.time() - t0,
    )  # fmt: skip
