"""Command lines of the workflow's steps: one argument spec per step, one runner.

Each ``scripts/<step>.py`` is two lines: ``run_step("<step>", snakemake)``. Run by
Snakemake, the runner takes the step's files from the rule's ``input``/``output``
and its settings from ``params.settings``; run from a shell
(``python scripts/align.py --help``, or ``hetrefine align --help``) it parses the
same arguments from the command line and the settings from ``--config``. Then it
sends logging to the rule's log, caps the BLAS threads (before numpy is
imported), and calls the step. A bad input ends the job with one line on
stderr naming the file, the row or field and what was expected; the log keeps
the traceback.

Also the console scripts ``hetrefine`` (any step, by name) and
``hetrefine-simulate`` (a simulated data set, with its truth).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from hetrefine.steps import SETTINGS, Settings


@dataclass(frozen=True)
class Arg:
    """One argument of a step function: a rule ``input``/``output``/``params`` entry."""

    name: str  # the step function's parameter
    kind: str  # "input" | "output" | "param"
    many: bool = False
    type: type = str
    help: str = ""
    optional: bool = False  # a list that may be empty (iteration 1 has no previous one)

    @property
    def attr(self) -> str:
        """The entry's name in the rule (outputs drop the ``out_`` prefix)."""
        return self.name.removeprefix("out_") if self.kind == "output" else self.name

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class StepSpec:
    """Where a step's function lives and what it takes."""

    module: str
    function: str
    description: str
    args: tuple[Arg, ...]
    device: bool = False  # takes the `device` choice


def _i(name, many=False, help="", optional=False):
    return Arg(name, "input", many, str, help, optional)


def _o(name, many=False, help=""):
    return Arg(name, "output", many, str, help)


_ITERATION = Arg("iteration", "param", False, int, "iteration number, 1..N")

STEPS: dict[str, StepSpec] = {
    "demo": StepSpec(
        "hetrefine.steps.demo", "simulate_demo", "Simulate the demo data set (config `demo:`).",
        (Arg("out_dir", "param", help="folder for particles.star, particles.mrcs, truth, models"),),
    ),
    "preprocess": StepSpec(
        "hetrefine.steps.preprocess", "preprocess",
        "Read the particles, crop to the refinement box, normalise, split half-sets, write shards.",
        (_i("particles", help="RELION .star or CryoSPARC .cs"), _o("out_info"), _o("out_metadata"),
         _o("out_sample"), _o("out_chunks", True, "one file per chunk, in order")),
    ),
    "mask": StepSpec(
        "hetrefine.steps.mask", "make_mask",
        "Soft spherical mask and the references' mask (mask.file, or mask.solvent) at the refinement box.",
        (_i("info", help="preprocess/info.json"), _o("out_mask"), _o("out_focus_mask"),
         _i("models", True, "the initial models (mask.solvent; none: the sphere)", True)),
    ),
    "init_references": StepSpec(
        "hetrefine.steps.init_references", "init_references",
        "Initial models -> iteration 0's references (refinement box, grey scale, low-pass).",
        (_i("models", True, "one MRC per class"), _i("info"), _i("sample"), _i("mask"), _o("out_refs"),
         _o("out_model")),
    ),
    "align": StepSpec(
        "hetrefine.steps.align", "align_chunks",
        "Align and classify one shard (its chunks in turn) against the previous iteration's references.",
        (_i("chunks", True, "the shard's preprocessed chunks, in order"), _i("refs"), _i("model"), _i("mask"), _i("focus_mask"),
         _i("prev_assign", True, "the shard's previous assignments (none in iteration 1)", True), _ITERATION,
         _o("out_assign"), _o("out_sums")),
        device=True,
    ),
    "reconstruct": StepSpec(
        "hetrefine.steps.reconstruct", "reconstruct",
        "Gather the shards' sums into this iteration's references and statistics.",
        (_i("assign", True), _i("sums", True), _i("prev_model"), _i("prev_refs"), _i("prev_assign", True, optional=True),
         _i("mask"), _ITERATION, _o("out_refs"), _o("out_model")),
    ),
    "hard_sums": StepSpec(
        "hetrefine.steps.hard_sums", "hard_sums", "One shard's hard-assignment sums (final maps).",
        (_i("chunks", True, "the shard's preprocessed chunks"), _i("assign"), _i("model"), _o("out_sums")),
        device=True,
    ),
    "reduce_sums": StepSpec(
        "hetrefine.steps.reduce_sums", "reduce_sums", "Add a few sums files into one (the sums tree).",
        (_i("sums", True), _o("out_sums")),
    ),
    "write_classes": StepSpec(
        "hetrefine.steps.write_classes", "write_classes",
        "The final files: particles_all.star/.cs, class folders, volumes_all.zip.",
        (_i("metadata"), _i("info"), _i("assign", True), _i("hard_sums", True), _i("refs"), _i("model"),
         _i("mask"), Arg("out_dir", "param", help="the run folder")),
    ),
    "plots": StepSpec(
        "hetrefine.steps.plots", "make_plots", "Every figure of a run.",
        (_i("models", True, "model.json per iteration, in order"), _i("refs", True, "references.npz, in order"),
         _i("assign", True), Arg("out_dir", "param", help="the plots folder"),
         _o("class_orientations", True, "class_XXX/orientations.png per class")),
    ),
}  # fmt: skip


def parser_for(step: str) -> argparse.ArgumentParser:
    """The command line of one step."""
    spec = STEPS[step]
    p = argparse.ArgumentParser(prog=f"hetrefine {step}", description=spec.description)
    for a in spec.args:
        if a.optional:  # a list that may be empty
            p.add_argument(a.flag, type=a.type, nargs="*", default=[], help=a.help)
        else:
            p.add_argument(
                a.flag, required=True, type=a.type, nargs="+" if a.many else None, help=a.help
            )
    p.add_argument("--config", default="config.yaml", help="config file (default: config.yaml)")
    p.add_argument("--log", help="log file (default: stderr)")
    p.add_argument("--threads", type=int, default=1)
    if spec.device:
        p.add_argument(
            "--device", choices=["auto", "cpu", "gpu"], help="default: the config's `device`"
        )
    return p


def _from_snakemake(smk, a: Arg):
    source = {"input": smk.input, "output": smk.output, "param": smk.params}[a.kind]
    value = getattr(source, a.attr)
    return [str(v) for v in value] if a.many else value


def run_step(step: str, smk=None, argv: Sequence[str] | None = None) -> None:
    """Run step ``step`` from Snakemake's ``snakemake`` object or a command line."""
    spec = STEPS[step]
    if smk is not None:
        kwargs = {a.name: _from_snakemake(smk, a) for a in spec.args}
        values = dict(smk.params.settings)
        device = smk.config.get("device", "auto")  # not a param: a device switch reruns nothing
        log_file, threads = (smk.log[0] if smk.log else None), smk.threads
    else:
        ns = vars(parser_for(step).parse_args(argv))
        kwargs = {a.name: ns[a.name] for a in spec.args}
        from hetrefine.config import load_config

        try:
            config = load_config(ns["config"])
        except Exception as exc:
            sys.exit(f"hetrefine {step}: {exc}")
        values = {k: config[k] for k in SETTINGS[step]}
        device = ns.get("device") or config["device"]
        log_file, threads = ns["log"], ns["threads"]
    job_setup(log_file, threads)
    fn = getattr(importlib.import_module(spec.module), spec.function)
    extra = {"device": device} if spec.device else {}
    try:
        fn(**kwargs, settings=Settings(values, step), **extra)
    except Exception as exc:
        if log_file:  # the traceback goes to the log; the user sees one line
            logging.getLogger("hetrefine").error("%s failed", step, exc_info=True)
            hint = f" (traceback in {log_file})"
        else:
            hint = " (--log FILE keeps the traceback)"
        sys.exit(f"hetrefine {step}: {one_line(exc)}{hint}")


def one_line(exc: BaseException) -> str:
    """What a user needs of an exception, in one line: our own errors say it
    themselves; a full disk or a permission names the file."""
    from hetrefine.errors import InputError

    if isinstance(exc, InputError):
        return str(exc)
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def job_setup(log: str | os.PathLike | None, threads: int = 1) -> None:
    """Prepare one workflow job before the kernel is imported: ``logging`` (and
    uncaught exceptions) to ``log`` (stderr when None), and the BLAS/OpenMP thread
    pools capped at ``threads`` (effective only before numpy's first import)."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(max(1, int(threads)))
    handler: logging.Handler = (
        logging.FileHandler(log, mode="w") if log else logging.StreamHandler(sys.stderr)
    )
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        handlers=[handler],
        force=True,
    )
    logging.captureWarnings(True)


def main(argv: Sequence[str] | None = None) -> None:
    """``hetrefine <step> ...``: run one step of the workflow by hand."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STEPS:
        lines = [f"  {name:16s} {spec.description}" for name, spec in STEPS.items()]
        print(
            "usage: hetrefine STEP [--help] ...\n\nsteps (as the workflow runs them):\n"
            + "\n".join(lines)
        )
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    run_step(argv[0], argv=argv[1:])


def simulate_main(argv: Sequence[str] | None = None) -> None:
    """``hetrefine-simulate``: a simulated particle set with its truth and initial models."""
    p = argparse.ArgumentParser(
        prog="hetrefine-simulate",
        description="Simulate a particle stack (RELION 3.1 STAR + MRC stack) of K conformations, with "
        "CTF and noise; writes particles.star, particles.mrcs, truth.csv, truth_class_XX.mrc and "
        "initial_model_XX.mrc (low-passed truth).",
    )
    p.add_argument("out_dir")
    p.add_argument("--particles", type=int, default=1000)
    p.add_argument("--classes", type=int, default=2)
    p.add_argument("--box", type=int, default=48, help="px, even")
    p.add_argument("--pixel-size", type=float, default=4.0, help="Angstrom")
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--domain-fraction", type=float, default=0.15)
    p.add_argument("--junk-fraction", type=float, default=0.0)
    p.add_argument("--decoy", action="store_true", help="also write a decoy initial model")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    job_setup(None, 1)
    from hetrefine.simulate import SimulationSpec, simulate_dataset

    spec = SimulationSpec(
        n_particles=a.particles, n_classes=a.classes, box=a.box, pixel_size=a.pixel_size, snr=a.snr,
        domain_fraction=a.domain_fraction, junk_fraction=a.junk_fraction, decoy=a.decoy, seed=a.seed,
    )  # fmt: skip
    simulate_dataset(spec, a.out_dir)
