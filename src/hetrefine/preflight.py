"""Pre-flight check: validate a run's inputs and estimate its jobs, memory and time.

Run it before a long job (``snakemake preflight`` or
``python -m hetrefine.preflight --config config.yaml``). It

* validates the config (:func:`hetrefine.config.validate_config`), the particle
  file (stacks readable, CTF and pixel size present, one pixel size), and the
  initial models (readable, their box and pixel size against the particles',
  what will be resampled, whether two of them are nearly identical);
* counts particles, shards, jobs per iteration and in total;
* estimates the peak memory of one align and one reconstruct job from the
  refinement box, shard size, K and the search grid (formula calibrated on
  measured peak RSS, see :func:`align_memory_bytes`), and warns, with the
  ``shard_size`` that would fit, when a job would not fit in this machine's
  available memory;
* measures the align step on a small sample of the real particles (or of
  simulated ones while the demo data do not exist yet) and scales it to one
  full-EM iteration on this machine.

It also generates ``docs/parameters.md`` from the config schema
(:func:`parameters_markdown`; ``python -m hetrefine.preflight
--write-parameters-doc``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hetrefine.errors import InputError

MB = 2**20
BASELINE_BYTES = 150 * MB
"""Fixed part of every job: Python + numpy + scipy + the kernel imported (~70 MB RSS)
plus the pose search's per-batch work arrays (~80 MB); calibrated on measured peak RSS
(box 32 to 96, K 2 to 3: estimates 1.0 to 1.4 x the measured peak)."""

ALIGN_THREADS = 4
"""Threads of one align job (``threads: 4`` of the align rule; fewer when --cores is smaller)."""

PARAMETERS_DOC = Path(__file__).resolve().parents[2] / "docs" / "parameters.md"
"""``docs/parameters.md`` in a source checkout."""


# ------------------------------------------------------------------ parameters doc


def _fmt_value(v) -> str:
    if v is None:
        return "`null`"
    if isinstance(v, bool):
        return "`true`" if v else "`false`"
    if isinstance(v, (list, dict)):
        return "`" + json.dumps(v) + "`" if v else ("`[]`" if isinstance(v, list) else "`{}`")
    return f"`{v}`"


def _unit(key: str) -> str:
    leaf = key.rsplit(".", 1)[-1]
    if leaf.endswith("_A") or leaf == "pixel_size":
        return "Angstrom"
    if leaf.endswith("_px") or leaf in ("box", "refine_box"):
        return "pixels"
    if leaf.endswith("_deg"):
        return "degrees"
    if leaf in ("shard_size", "n_particles", "batch_size_per_class"):
        return "particles"
    if "iterations" in leaf:
        return "iterations"
    if leaf in ("domain_fraction", "junk_fraction", "class_similarity", "online_em_decay"):
        return "fraction"
    return ""


def _bounds(sub: dict) -> str:
    parts = []
    if "minimum" in sub:
        parts.append(f">= {sub['minimum']}")
    if "exclusiveMinimum" in sub:
        parts.append(f"> {sub['exclusiveMinimum']}")
    if "maximum" in sub:
        parts.append(f"<= {sub['maximum']}")
    if "exclusiveMaximum" in sub:
        parts.append(f"< {sub['exclusiveMaximum']}")
    if sub.get("multipleOf") == 2:
        parts.append("even")
    elif "multipleOf" in sub:
        parts.append(f"multiple of {sub['multipleOf']}")
    if "enum" in sub:
        parts.append("one of " + ", ".join(f"`{e}`" for e in sub["enum"]))
    if "pattern" in sub:
        parts.append(f"matches `{sub['pattern']}`")
    if "minItems" in sub:
        parts.append(f"at least {sub['minItems']} entries")
    if "minLength" in sub:
        parts.append("non-empty")
    return ", ".join(parts).replace("|", "\\|")


def _type(sub: dict) -> str:
    t = sub.get("type", "")
    types = [t] if isinstance(t, str) else list(t)
    if "array" in types and isinstance(sub.get("items"), dict):
        types = [
            f"array of {sub['items'].get('type', 'any')}" if x == "array" else x for x in types
        ]
    return " or ".join(types)


def _rows(schema: dict, prefix: str = "") -> list[tuple[str, dict]]:
    rows = []
    for key, sub in schema.get("properties", {}).items():
        full = f"{prefix}{key}"
        rows.append((full, sub))
        if "properties" in sub:
            rows += _rows(sub, prefix=f"{full}.")
    return rows


def parameters_markdown(schema: dict) -> str:
    """``docs/parameters.md``: one table row per config key (nested keys dotted).

    schema: the config JSON schema as a dict (``hetrefine.config.load_schema()``).
    Columns: key, type, meaning (the schema's description), unit (from the key's
    suffix: ``_A`` Angstrom, ``_px`` pixels, ``_deg`` degrees), default, bounds.
    Deterministic: the same schema gives the same bytes.
    """

    def clean(text: str) -> str:
        return " ".join(str(text).split()).replace("|", "\\|")

    lines = [
        "# Configuration parameters",
        "",
        "<!-- Generated from workflow/schemas/config.schema.yaml by "
        "`python -m hetrefine.preflight --write-parameters-doc`; do not edit by hand. -->",
        "",
        clean(schema.get("description", "")),
        "",
        "Set them in `config.yaml`, or one at a time on the command line "
        "(`snakemake --cores 8 --config iterations=12`). Nested keys (`mask.*`, `demo.*`) "
        "go under their section in the YAML file. A value outside its bounds, or an unknown "
        "key, is refused before any job runs.",
        "",
        "| key | type | meaning | unit | default | bounds |",
        "|---|---|---|---|---|---|",
    ]
    for key, sub in _rows(schema):
        default = _fmt_value(sub["default"]) if "default" in sub else ""
        if "properties" in sub:
            default = "(section)"
        lines.append(
            f"| `{key}` | {_type(sub)} | {clean(sub.get('description', ''))} | {_unit(key)} "
            f"| {default} | {_bounds(sub)} |"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ estimates


def n_shift_points(shift_range_px: float, shift_step_px: float) -> int:
    """Number of shifts of the coarse search grid (``sampling.shift_grid``)."""
    from hetrefine.sampling import shift_grid

    return len(shift_grid(shift_range_px, shift_step_px))


def n_rotations(coarse_angle_step_deg: float, symmetry: str = "C1") -> int:
    """Number of rotations of the coarse global grid (after the asymmetric-unit reduction)."""
    from hetrefine.steps import _rotation_grid

    return len(
        _rotation_grid({"coarse_angle_step_deg": coarse_angle_step_deg, "symmetry": symmetry})
    )


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


# ------------------------------------------------------------------ report


@dataclass
class Report:
    """What the pre-flight check found: ``errors`` stop a run, ``warnings`` may not.

    ``facts`` holds the numbers (for programs and tests); ``lines`` the
    human-readable report in order. ``str(report)`` is the printed text.
    """

    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    facts: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def info(self, text: str) -> None:
        self.lines.append(text)

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        self.lines.append(f"WARNING: {text}")

    def error(self, text: str) -> None:
        self.errors.append(text)
        self.lines.append(f"ERROR: {text}")

    def __str__(self) -> str:
        verdict = (
            "pre-flight: OK" + (f" ({len(self.warnings)} warning(s))" if self.warnings else "")
            if self.ok
            else f"pre-flight: FAILED ({len(self.errors)} error(s)); fix these before running"
        )
        return "\n".join([*self.lines, "", verdict]) + "\n"


def _gb(n: float) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / MB:.0f} MB"


# ------------------------------------------------------------------ the check


def run_preflight(
    config: dict,
    workdir: str | os.PathLike = ".",
    *,
    measure: bool = True,
    sample: int = 32,
    cores: int | None = None,
    schema_path: str | os.PathLike | None = None,
) -> Report:
    """Check a run's inputs and estimate its jobs, memory and time; never raises for bad input.

    config: the config dict (as in config.yaml; validated and completed here).
    workdir: the folder relative paths in the config are resolved against (the
    workflow's folder). measure: time the align step on ``sample`` particles
    (and 3 x ``sample``) of the real data in a subprocess; False skips it.
    cores: cores for the local time estimate (default: all of this machine's).
    Returns a :class:`Report`; ``report.facts`` has ``n_particles``,
    ``n_shards``, ``jobs_per_iteration``, ``total_jobs``, ``align_mem_bytes``,
    ``reconstruct_mem_bytes``, ``align_job_s``, ``iteration_s`` and more.
    """
    from hetrefine import config as cfg

    rep = Report()
    work = Path(workdir)
    try:
        config = cfg.validate_config(config, schema_path=schema_path)
    except InputError as exc:
        rep.error(f"config: {exc}")
        return rep
    rep.info(f"config: valid (run '{config['run']}', results in results/{config['run']}/)")

    particles = config["particles"]
    is_demo = os.path.normpath(particles) == os.path.normpath(cfg.DEMO_PARTICLES)
    k = len(config["initial_models"])
    demo_missing = is_demo and not (work / particles).is_file()

    # ---- particles
    table = None
    if demo_missing:
        d = config["demo"]
        n, in_box, in_px = int(d["n_particles"]), int(d["box"]), float(d["pixel_size"])
        rep.info(
            f"particles: the demo data set ({n} simulated particles, box {in_box}, "
            f"{in_px} A/px) will be simulated by the workflow"
        )
    else:
        from hetrefine.io.particles import read_particles

        try:
            table = read_particles(
                work / particles,
                pixel_size=config["pixel_size"],
                project_dir=(work / config["project_dir"]) if config["project_dir"] else None,
            )
        except InputError as exc:
            rep.error(f"particles: {exc}")
            return rep
        n = len(table)
        in_box = int(table["rlnImageSize"].iloc[0])
        in_px = float(table["rlnImagePixelSize"].iloc[0])
        n_stacks = table["hr_stack"].nunique()
        groups = table["rlnOpticsGroup"].nunique()
        rep.info(
            f"particles: {n} in {particles} ({n_stacks} stack(s), {groups} optics group(s)), "
            f"box {in_box} px at {in_px:.4g} A/px, CTF present"
        )
        try:
            _read_sample_images(table, [0, n - 1])
        except InputError as exc:
            rep.error(f"particle images: {exc}")
            return rep
        if "rlnPhaseShift" in table.columns and float(table["rlnPhaseShift"].abs().max()) > 0:
            rep.info("particles: phase-plate phase shifts present (used in the CTF)")

    box = int(config["refine_box"] or in_box)
    if box > in_box:
        rep.error(
            f"config: refine_box = {box} px is larger than the particle box ({in_box} px); "
            "the refinement box can only crop"
        )
        return rep
    px = in_px * in_box / box
    nyquist = 2 * px
    rep.info(
        f"refinement box: {box} px at {px:.4g} A/px (Nyquist {nyquist:.3g} A)"
        + (f", Fourier-cropped from {in_box} px" if box != in_box else "")
    )
    from hetrefine.steps import mask_diameters

    inner, outer = mask_diameters(config, box, px)
    if config["mask"]["enabled"] and outer > box * px * 1.0001:
        rep.error(
            f"mask: diameters {inner:.0f}/{outer:.0f} A exceed the box ({box * px:.0f} A); "
            "lower particle_diameter_A or mask.inner_diameter_A / mask.outer_diameter_A"
        )
    elif config["mask"]["enabled"]:
        rep.info(
            f"mask: soft sphere, inner {inner:.0f} A, outer {outer:.0f} A (box {box * px:.0f} A)"
        )

    # ---- initial models
    models = _check_models(config, work, rep, box, px, in_box, in_px, demo_missing)
    rep.info(f"classes: K = {k} (one per initial model)")
    if rep.errors:
        return rep

    # ---- jobs
    shard_n = min(int(config["shard_size"]), n)
    n_shards = cfg.n_shards(n, int(config["shard_size"]))
    iters = int(config["iterations"])
    jobs_iter = n_shards + 1
    jobs = total_jobs(n_shards, iters, demo_missing)
    rep.info(
        f"jobs: {n_shards} shard(s) of up to {shard_n} particles; per iteration {n_shards} align "
        f"+ 1 reconstruct = {jobs_iter}; {iters} iterations; {jobs} jobs in the whole run"
    )
    online = int(config["online_em_iterations"])
    if online:
        used = min(n, int(config["batch_size_per_class"]) * k)
        rep.info(
            f"online EM: the first {online} iteration(s) use a random batch of about {used} "
            f"particles ({config['batch_size_per_class']} per class), the rest all {n}"
        )

    # ---- memory
    n_s = n_shift_points(config["shift_range_px"], config["shift_step_px"])
    n_r = n_rotations(config["coarse_angle_step_deg"], config["symmetry"])
    mem_a = align_memory_bytes(shard_n, box, k, n_s, n_r)
    mem_r = reconstruct_memory_bytes(box, k)
    avail = available_memory_bytes()
    rep.info(
        f"memory: align job ~{_gb(mem_a)} (shard {shard_n}, box {box}, K {k}, "
        f"{n_r} rotations x {n_s} shifts in the coarse search); reconstruct job ~{_gb(mem_r)}; "
        f"this machine has {_gb(avail)} available"
    )
    if avail and mem_a > avail:
        fit = fitting_shard_size(int(0.8 * avail), box, k, n_s, n_r)
        if fit >= 1:
            rep.warn(
                f"an align job needs ~{_gb(mem_a)} but only {_gb(avail)} is available: "
                f"set shard_size: {fit} (or less), or a smaller refine_box"
            )
        else:
            rep.warn(
                f"an align job needs ~{_gb(mem_a)} but only {_gb(avail)} is available, even "
                f"with a tiny shard: lower refine_box (now {box}) or coarsen "
                "coarse_angle_step_deg / shift_range_px"
            )
    if avail and mem_r > avail:
        rep.warn(
            f"the reconstruct job needs ~{_gb(mem_r)} but only {_gb(avail)} is available: "
            "lower refine_box"
        )
    rep.facts.update(
        n_particles=n,
        n_shards=n_shards,
        shard_size=shard_n,
        box=box,
        pixel_size=px,
        k=k,
        n_rotations=n_r,
        n_shifts=n_s,
        jobs_per_iteration=jobs_iter,
        total_jobs=jobs,
        align_mem_bytes=mem_a,
        reconstruct_mem_bytes=mem_r,
        available_bytes=avail,
    )

    # ---- time
    if measure:
        cores = int(cores or os.cpu_count() or 1)
        try:
            t = measure_sample(config, work, table, models, box, px, in_box, sample, cores)
        except InputError as exc:
            rep.error(f"sample run: {exc}")
            return rep
        per = t["per_particle_s"]
        fixed = t["fixed_s"]
        job_s = t["startup_s"] + fixed + per * shard_n
        threads = min(ALIGN_THREADS, cores)
        parallel = max(1, cores // threads)
        waves = math.ceil(n_shards / parallel)
        iter_s = waves * job_s + t["reconstruct_s"]
        # online-EM iterations align only a random batch, spread over every shard
        online = min(int(config["online_em_iterations"]), iters)
        used = min(n, int(config["batch_size_per_class"]) * k)
        online_job_s = t["startup_s"] + fixed + per * min(shard_n, used / n_shards)
        run_s = online * (waves * online_job_s + t["reconstruct_s"]) + (iters - online) * iter_s
        rep.info(
            f"time: measured align on {t['n_small']} and {t['n_large']} particles "
            f"({t['t_small']:.2f} s, {t['t_large']:.2f} s; {t['device']}, {threads} thread(s)): "
            f"{t['startup_s'] + fixed:.1f} s per job + {per * 1000:.1f} ms per particle"
        )
        rep.info(
            f"time: ~{_dur(job_s)} per align job, reconstruct ~{_dur(t['reconstruct_s'])}; "
            f"one full-EM iteration ~{_dur(iter_s)} on {cores} core(s) "
            f"({parallel} align job(s) at a time); the run ~{_dur(run_s)} (an upper bound: "
            "every iteration timed at the highest resolution)"
        )
        if t["grey_scales"]:
            for path, a in zip(config["initial_models"], t["grey_scales"]):
                if a < 0:
                    rep.warn(
                        f"{path}: contrast looks inverted relative to the particles "
                        f"(grey scale {a:.3g}); the workflow flips it, but check the model"
                    )
        rep.facts.update(
            align_job_s=job_s,
            iteration_s=iter_s,
            run_s=run_s,
            reconstruct_s=t["reconstruct_s"],
            per_particle_s=per,
            fixed_s=fixed,
            sample_peak_rss_bytes=t["peak_rss_bytes"],
            cores=cores,
        )
    return rep


def _dur(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def _read_sample_images(table, rows: list[int]) -> np.ndarray:
    from hetrefine.io.particles import read_images

    rows = sorted(set(int(r) for r in rows))
    return read_images(table.iloc[rows])


def _check_models(config, work: Path, rep: Report, box, px, in_box, in_px, demo_missing):
    """Read each initial model; report its box/pixel size and what happens to it."""
    from hetrefine.io.mrc import MrcError, read_volume
    from hetrefine.steps import resample_volume

    demo_models = set()
    if demo_missing:
        from hetrefine.config import demo_initial_models

        demo_models = {os.path.normpath(p) for p in demo_initial_models(config["demo"])}
    vols = []
    for path in config["initial_models"]:
        if os.path.normpath(path) in demo_models:
            rep.info(f"initial model {path}: written by the demo simulation")
            vols.append(None)
            continue
        try:
            vol, vpx = read_volume(work / path)
        except MrcError as exc:
            rep.error(f"initial model: {exc}")
            vols.append(None)
            continue
        n = vol.shape[0]
        note = ""
        if vpx <= 0:
            vpx = in_px
            rep.warn(
                f"{path}: no pixel size in the header; the particles' {in_px:.4g} A is assumed"
            )
        extent, particle_extent = n * vpx, in_box * in_px
        if extent < 0.5 * particle_extent or extent > 2.5 * particle_extent:
            rep.warn(
                f"{path}: the map spans {extent:.0f} A ({n} px at {vpx:.4g} A/px) but the "
                f"particle box spans {particle_extent:.0f} A: is the header pixel size right? "
                "Fix it with relion_image_handler --i map.mrc --o fixed.mrc --force_header_angpix <A>"
            )
        if n != box or abs(vpx - px) > 1e-3 * px:
            note = f"; resampled to box {box} at {px:.4g} A/px"
        if not np.any(vol) or float(vol.std()) == 0:
            rep.error(f"{path}: the map is constant (empty)")
        rep.info(f"initial model {path}: box {n} px at {vpx:.4g} A/px{note}")
        vols.append(resample_volume(vol, vpx, box, px))
    real = [(p, v) for p, v in zip(config["initial_models"], vols) if v is not None]
    for i in range(len(real)):
        for j in range(i + 1, len(real)):
            a, b = real[i][1].ravel(), real[j][1].ravel()
            a, b = a - a.mean(), b - b.mean()
            cc = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))
            if cc > 0.995:
                rep.warn(
                    f"{real[i][0]} and {real[j][0]} are nearly identical (correlation "
                    f"{cc:.4f}); the classes may not separate: use distinct ab-initio maps"
                )
    return vols


# ------------------------------------------------------------------ measured sample


def _sample_shard(
    config, work, table, box, in_box, n_take: int, tmp: Path
) -> tuple[np.ndarray, ...]:
    """Images (n, D, D) float32 normalised at the refinement box, CTF (n, 8), half (n,)."""
    from hetrefine.ctf import CTF_FIELDS
    from hetrefine.fourier import fourier_resize, normalize_images
    from hetrefine.steps import particle_diameter_A

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
    from hetrefine.io.particles import read_images

    imgs = read_images(sub)
    if box != in_box:
        imgs = fourier_resize(imgs, box)
    px_in = float(table["rlnImagePixelSize"].iloc[0])
    px = px_in * in_box / box
    imgs = normalize_images(imgs, particle_diameter_A(config, box, px) / 2 / px)
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
    from hetrefine import steps

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
            "n_shards": 1,
            "box": box,
            "pixel_size": px,
            "input_box": in_box,
            "input_pixel_size": in_px,
        }
        (pre / "info.json").write_text(json.dumps(info))
        for name, n in (("small", n_small), ("large", n_large)):
            np.savez(
                pre / f"shard_{name}.npz",
                images=imgs[:n],
                index=np.arange(n, dtype=np.int64),
                half=half[:n],
                ctf=ctf[:n],
            )
        conf = dict(config)
        conf["online_em_iterations"] = 0
        model_paths = [str(work / p) for p in config["initial_models"]]
        if any(m is None for m in models):  # demo models: from the simulated sample
            sim = tmp / "sim"
            model_paths = [str(sim / f"initial_model_{i + 1:02d}.mrc") for i in range(len(models))]
        steps.make_mask(str(pre / "info.json"), str(tmp / "mask.mrc"), conf)
        steps.init_references(
            model_paths,
            str(pre / "info.json"),
            str(pre / "shard_large.npz"),
            str(tmp / "mask.mrc"),
            str(tmp / "refs.npz"),
            str(tmp / "model.json"),
            conf,
        )
        model = json.loads((tmp / "model.json").read_text())
        model["res_limit_px"] = steps.resolution_limit_px(box / 2, box, px, conf)
        model["n_particles"] = n_large
        (tmp / "model.json").write_text(json.dumps(model))
        (tmp / "config.json").write_text(json.dumps(conf))
        threads = min(ALIGN_THREADS, cores)
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "hetrefine.preflight", "--measure-dir", str(tmp)],
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


def _measure_in_subprocess(tmp: Path) -> dict:
    """The timed part of :func:`measure_sample` (run in a fresh process)."""
    import logging
    import resource

    from hetrefine import steps
    from hetrefine.backend import select_device

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
        steps.align_shard(
            str(tmp / "preprocess" / f"shard_{name}.npz"),
            str(tmp / "refs.npz"),
            str(tmp / "model.json"),
            str(tmp / "mask.mrc"),
            late,
            str(tmp / f"assign_{name}.npz"),
            str(tmp / f"sums_{name}.npz"),
            conf,
        )
        times[name] = min(times.get(name, math.inf), time.perf_counter() - t0)
    t0 = time.perf_counter()
    steps.reconstruct(
        [str(tmp / "assign_large.npz")],
        [str(tmp / "sums_large.npz")],
        str(tmp / "model.json"),
        [],
        str(tmp / "mask.mrc"),
        late,
        str(tmp / "out_refs.npz"),
        str(tmp / "out_model.json"),
        conf,
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


# ------------------------------------------------------------------ command line


def main(argv: list[str] | None = None) -> int:
    """``python -m hetrefine.preflight``: print the report; exit 1 on errors."""
    p = argparse.ArgumentParser(
        prog="python -m hetrefine.preflight",
        description="Check a hetrefine run's inputs and estimate its jobs, memory and time.",
    )
    p.add_argument("--config", default="config.yaml", help="config file (default: config.yaml)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a top-level key as with snakemake --config (repeatable)",
    )
    p.add_argument("--workdir", default=".", help="folder the config's paths are relative to")
    p.add_argument("--no-measure", action="store_true", help="skip the timed sample run")
    p.add_argument("--sample", type=int, default=32, help="particles in the timed sample")
    p.add_argument("--cores", type=int, help="cores for the time estimate (default: all)")
    p.add_argument("--out", help="also write the report to this file")
    p.add_argument(
        "--write-parameters-doc",
        nargs="?",
        const=str(PARAMETERS_DOC),
        metavar="PATH",
        help="regenerate docs/parameters.md from the config schema and exit",
    )
    p.add_argument("--measure-dir", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.measure_dir:
        print(json.dumps(_measure_in_subprocess(Path(a.measure_dir))))
        return 0
    from hetrefine.config import load_schema

    if a.write_parameters_doc:
        out = Path(a.write_parameters_doc)
        out.write_text(parameters_markdown(load_schema()))
        print(f"wrote {out}")
        return 0
    import yaml

    path = Path(a.config)
    if not path.is_file():
        print(f"ERROR: {path}: config file does not exist", file=sys.stderr)
        return 1
    config = yaml.safe_load(path.read_text()) or {}
    for item in a.set:
        key, _, value = item.partition("=")
        config[key] = yaml.safe_load(value) if value else value
    rep = run_preflight(config, a.workdir, measure=not a.no_measure, sample=a.sample, cores=a.cores)
    text = str(rep)
    print(text, end="")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
