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
from hetrefine.plan import n_chunks, n_shards, reduce_children, reduce_levels, shard_chunks
from hetrefine.steps import settings_for
from hetrefine.steps.align import align_chunks
from hetrefine.steps.hard_sums import hard_sums
from hetrefine.steps.init_references import init_references
from hetrefine.steps.mask import make_mask
from hetrefine.steps.preprocess import preprocess
from hetrefine.steps.reconstruct import reconstruct
from hetrefine.steps.reduce_sums import reduce_sums
from hetrefine.steps.write_classes import write_classes


@dataclass(frozen=True)
class DriverRun(RunLayout):
    """A run's layout, its shard count and each shard's chunk files."""

    n_shards: int = 1
    chunks: tuple[tuple[str, ...], ...] = ()

    def all_assignments(self, it: int) -> list[str]:
        """Every shard's assignment file of iteration ``it``."""
        return [self.assignments(it, s) for s in range(self.n_shards)]


def prepare_run(particles: str, initial_models: list[str], out_dir: str, config: dict) -> DriverRun:
    """Preprocess, mask and init (iteration 0) under ``out_dir``; the run's layout.
    The shards are the workflow's (``shard_size``, ``workers``: ``hetrefine.plan``)."""
    n = count_particles(particles)
    size, workers = config["shard_size"], config.get("workers")
    layout = RunLayout(str(out_dir))
    chunks = tuple(
        tuple(layout.chunk(c) for c in shard_chunks(s, n, size, workers))
        for s in range(n_shards(n, size, workers))
    )
    run = DriverRun(str(out_dir), len(chunks), chunks)
    all_chunks = [run.chunk(c) for c in range(n_chunks(n, size))]
    preprocess(
        particles,
        run.info,
        run.metadata,
        run.sample,
        all_chunks,
        settings_for("preprocess", config),
    )
    make_mask(
        run.info, run.mask, run.focus_mask, list(initial_models), settings_for("mask", config)
    )
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
    for it in range(1, int(config["iterations"]) + 1):
        run_iteration(run, config, it)
    if final_outputs:
        finish_run(run, config)
    return run


def finish_run(run: DriverRun, config: dict) -> None:
    """The hard sums of the last iteration (``config['iterations']``) and the final
    per-class outputs (``write_classes``) under the run folder."""
    n_iter, device = int(config["iterations"]), config.get("device", "auto")
    hard = [run.hard_sums(s) for s in range(run.n_shards)]
    for s in range(run.n_shards):
        hard_sums(
            list(run.chunks[s]), run.assignments(n_iter, s), run.model(n_iter), hard[s],
            settings_for("hard_sums", config), device,
        )  # fmt: skip
    top = reduce_tree(run, "final", hard)
    write_classes(
        run.metadata, run.info, run.all_assignments(n_iter), top, run.references(n_iter), run.model(n_iter),
        run.mask, str(run.root), settings_for("write_classes", config),
    )  # fmt: skip


def run_iteration(run: DriverRun, config: dict, it: int) -> None:
    """Iteration ``it`` as the workflow runs it: align every shard, reduce the sums,
    reconstruct (a pass-through once the run has stopped: ``hetrefine.convergence``).
    The iteration's sums are deleted once used."""
    device = config.get("device", "auto")
    assign = run.all_assignments(it)
    sums = [run.sums(it, s) for s in range(run.n_shards)]
    prev = run.all_assignments(it - 1) if it > 1 else []
    for s in range(run.n_shards):
        align_chunks(
            list(run.chunks[s]), run.references(it - 1), run.model(it - 1), run.mask, run.focus_mask,
            prev[s : s + 1], it, assign[s], sums[s], settings_for("align", config), device,
        )  # fmt: skip
    top = reduce_tree(run, run.iteration_stage(it), sums)
    reconstruct(
        assign, top, run.model(it - 1), run.references(it - 1), prev, run.mask, it,
        run.references(it), run.model(it), settings_for("reconstruct", config),
    )  # fmt: skip
    for p in {*sums, *top}:
        Path(p).unlink(missing_ok=True)


def reduce_tree(run: RunLayout, stage: str, leaves: list[str]) -> list[str]:
    """The workflow's sums tree over ``leaves`` (``reduce_sums`` per node, level by level,
    each level's inputs deleted once added); the files the reader takes."""
    below = list(leaves)
    for level, n_nodes in enumerate(reduce_levels(len(leaves)), start=1):
        nodes = [run.tree_sums(stage, level, j) for j in range(n_nodes)]
        for j, node in enumerate(nodes):
            reduce_sums(
                [below[i] for i in reduce_children(j, len(below))],
                node,
                settings_for("reduce_sums", {}),
            )
        if level > 1:
            for p in below:
                Path(p).unlink(missing_ok=True)
        below = nodes
    return below
