"""The whole refinement in one process, step after step (for tests and benchmarks).

Users run the Snakemake workflow, which calls the same step functions with the
same files, one job per shard; this sequential driver exists so that tests and
benchmarks can run the engine without Snakemake and read its intermediate
files. It writes the same layout (``hetrefine.io.run_files.RunLayout``) under
``out_dir``, and gives each step only its settings, as the workflow does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hetrefine.io.particles import count_particles
from hetrefine.io.run_files import RunLayout
from hetrefine.plan import n_shards
from hetrefine.steps import settings_for
from hetrefine.steps.align import align_shard
from hetrefine.steps.hard_sums import hard_sums
from hetrefine.steps.init_references import init_references
from hetrefine.steps.mask import make_mask
from hetrefine.steps.preprocess import preprocess
from hetrefine.steps.reconstruct import reconstruct
from hetrefine.steps.write_classes import write_classes


@dataclass(frozen=True)
class DriverRun(RunLayout):
    """A run's layout and its shard count."""

    n_shards: int = 1

    def all_assignments(self, it: int) -> list[str]:
        """Every shard's assignment file of iteration ``it``."""
        return [self.assignments(it, s) for s in range(self.n_shards)]


def prepare_run(particles: str, initial_models: list[str], out_dir: str, config: dict) -> DriverRun:
    """Preprocess, mask and init (iteration 0) under ``out_dir``; the run's layout."""
    n_sh = n_shards(count_particles(particles), int(config["shard_size"]))
    run = DriverRun(str(out_dir), n_sh)
    shards = [run.shard(s) for s in range(n_sh)]
    preprocess(
        particles, run.info, run.metadata, run.sample, shards, settings_for("preprocess", config)
    )
    make_mask(run.info, run.mask, run.focus_mask, settings_for("mask", config))
    init_references(
        list(initial_models), run.info, run.sample, run.mask, run.references(0), run.model(0),
        settings_for("init_references", config),
    )  # fmt: skip
    return run


def run_pipeline(
    particles: str,
    initial_models: list[str],
    out_dir: str,
    config: dict,
    final_outputs: bool = True,
) -> DriverRun:
    """:func:`prepare_run`, ``config['iterations']`` iterations, and (optionally) the
    final per-class outputs, sequentially. Per-shard sums are deleted once used.
    ``config``: a complete config (``hetrefine.config.defaults()`` and changes)."""
    run = prepare_run(particles, initial_models, out_dir, config)
    n_sh = run.n_shards
    shards = [run.shard(s) for s in range(n_sh)]
    device = config.get("device", "auto")
    n_iter = int(config["iterations"])
    for it in range(1, n_iter + 1):
        assign = run.all_assignments(it)
        sums = [run.sums(it, s) for s in range(n_sh)]
        for s in range(n_sh):
            align_shard(
                shards[s], run.references(it - 1), run.model(it - 1), run.mask, run.focus_mask, it,
                assign[s], sums[s], settings_for("align", config), device,
            )  # fmt: skip
        prev = run.all_assignments(it - 1) if it > 1 else []
        reconstruct(
            assign, sums, run.model(it - 1), run.references(it - 1), prev, run.mask, it,
            run.references(it), run.model(it), settings_for("reconstruct", config),
        )  # fmt: skip
        for p in sums:
            Path(p).unlink(missing_ok=True)
    if final_outputs:
        hard = [run.hard_sums(s) for s in range(n_sh)]
        for s in range(n_sh):
            hard_sums(
                shards[s],
                run.assignments(n_iter, s),
                run.info,
                hard[s],
                settings_for("hard_sums", config),
                device,
            )
        write_classes(
            run.metadata, run.info, run.all_assignments(n_iter), hard, run.references(n_iter), run.model(n_iter),
            run.mask, str(run.root), settings_for("write_classes", config),
        )  # fmt: skip
    return run
