"""Pre-flight check: validate a run's inputs and estimate its jobs, memory and time.

Run it before a long job (``snakemake preflight`` or
``python -m hetrefine.preflight --config config.yaml``). It

* validates the config (:func:`hetrefine.config.validate_config`), the particle
  file (stacks readable, CTF and pixel size present, one pixel size, every image
  finite and not constant), and the initial models (readable, their box and pixel
  size against the particles', what will be resampled, whether two of them are
  nearly identical), with the same checks as the run (:mod:`hetrefine.validation`,
  :func:`hetrefine.backend.select_device`), so the two give the same message;
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
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hetrefine.backend import select_device
from hetrefine.errors import InputError
from hetrefine.parameters_doc import PARAMETERS_DOC, parameters_markdown
from hetrefine.plan import (
    ALIGN_THREADS,
    MB,
    align_memory_bytes,
    available_memory_bytes,
    fitting_shard_size,
    n_rotations,
    n_shift_points,
    reconstruct_memory_bytes,
    total_jobs,
)
from hetrefine.plan import (
    n_shards as plan_n_shards,
)
from hetrefine.step_timing import measure_sample
from hetrefine.validation import check_images, check_input_poses, check_mask_fits, has_poses

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
        t_scan = time.perf_counter()
        try:  # every image, as preprocess reads them: a NaN anywhere is found
            check_input_poses(config["input_poses"], has_poses(table.columns))
            check_images(work / particles, table)
        except InputError as exc:
            rep.error(f"particles: {exc}")
            return rep
        rep.info(
            f"particle images: all {n} read in {time.perf_counter() - t_scan:.1f} s; "
            "finite, none constant"
        )
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
    m = config["mask"]
    try:
        inner, outer = check_mask_fits(
            box, px, config["particle_diameter_A"], m["inner_diameter_A"], m["outer_diameter_A"],
            m["enabled"],
        )  # fmt: skip
        if m["enabled"]:
            rep.info(
                f"mask: soft sphere, inner {inner:.0f} A, outer {outer:.0f} A (box {box * px:.0f} A)"
            )
    except InputError as exc:
        rep.error(f"mask: {exc}")
    try:  # the same call as the align job's
        select_device(config["device"])
    except (RuntimeError, ValueError) as exc:
        rep.error(f"device: {exc}")

    # ---- initial models
    models = _check_models(config, work, rep, box, px, in_box, in_px, demo_missing)
    rep.info(f"classes: K = {k} (one per initial model)")
    if rep.errors:
        return rep

    # ---- jobs
    shard_n = min(int(config["shard_size"]), n)
    n_shards = plan_n_shards(n, int(config["shard_size"]))
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


def _check_models(config, work: Path, rep: Report, box, px, in_box, in_px, demo_missing):
    """Read each initial model; report its box/pixel size and what happens to it."""
    from hetrefine.fourier import resample_volume
    from hetrefine.io.mrc import MrcError
    from hetrefine.validation import read_initial_model

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
            vol, vpx = read_initial_model(work / path)
        except (MrcError, InputError) as exc:
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
                    f"{cc:.4f}); the run splits their particles at random in iteration 1 "
                    "(random subsets) and may need more iterations to separate the classes"
                )
    return vols


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
    a = p.parse_args(argv)

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
    try:
        config = yaml.safe_load(path.read_text()) or {}
        for item in a.set:
            key, _, value = item.partition("=")
            config[key] = yaml.safe_load(value) if value else value
    except yaml.YAMLError as exc:  # bad syntax, or a tag such as !!python/object
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        print(f"ERROR: {path}: not valid YAML{at}: {problem}", file=sys.stderr)
        return 1
    if not isinstance(config, dict):
        print(
            f"ERROR: {path}: expected a mapping of keys to values at the top level", file=sys.stderr
        )
        return 1
    rep = run_preflight(config, a.workdir, measure=not a.no_measure, sample=a.sample, cores=a.cores)
    text = str(rep)
    print(text, end="")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())


def snakemake_main(smk) -> None:
    """The `preflight` rule: the report to Snakemake's output, the log and the rule's
    output file; exit 1 on errors."""
    report = run_preflight(dict(smk.config), ".", cores=smk.threads)
    text = str(report)
    print(text, end="", file=sys.stderr)  # shown in Snakemake's output
    for path in (smk.log[0], smk.output.report):
        Path(path).write_text(text)
    if not report.ok:
        sys.exit(1)
