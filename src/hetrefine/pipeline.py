"""The whole refinement in one process, step after step (for tests and benchmarks).

Users run the Snakemake workflow, which calls the same step functions with the
same files, one job per shard; this sequential driver exists so that tests and
benchmarks can run the engine without Snakemake and read its intermediate
files. It writes the same layout as the workflow under ``out_dir``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from hetrefine import steps
from hetrefine.io.particles import count_particles


@dataclass
class RunPaths:
    """Where a run's files are (same names as the workflow's)."""

    root: Path
    n_shards: int

    def shard(self, s: int) -> str:
        return str(self.root / "preprocess" / f"shard_{s:04d}.npz")

    def refs(self, it: int) -> str:
        return str(self.root / f"iter_{it:03d}" / "references.npz")

    def model(self, it: int) -> str:
        return str(self.root / f"iter_{it:03d}" / "model.json")

    def assign(self, it: int) -> list[str]:
        return [str(self.root / f"iter_{it:03d}" / "align" / f"shard_{s:04d}.npz") for s in range(self.n_shards)]

    def sums(self, it: int) -> list[str]:
        return [
            str(self.root / f"iter_{it:03d}" / "align" / f"shard_{s:04d}.sums.npz")
            for s in range(self.n_shards)
        ]

    @property
    def info(self) -> str:
        return str(self.root / "preprocess" / "info.json")

    @property
    def mask(self) -> str:
        return str(self.root / "mask.mrc")


def run_pipeline(
    particles: str, initial_models: list[str], out_dir: str, config: dict, final_outputs: bool = True
) -> RunPaths:
    """Preprocess, mask, init, ``config['iterations']`` iterations, and (optionally) the
    final per-class outputs, sequentially. Per-shard sums are deleted once used."""
    n = count_particles(particles)
    paths = RunPaths(Path(out_dir), max(1, math.ceil(n / int(config["shard_size"]))))
    steps.preprocess(particles, str(paths.root / "preprocess"), paths.n_shards, config)
    steps.make_mask(paths.info, paths.mask, config)
    steps.init_references(
        list(initial_models), paths.info, str(paths.root / "preprocess" / "sample.npz"), paths.mask, paths.refs(0), paths.model(0), config
    )
    n_iter = int(config["iterations"])
    for it in range(1, n_iter + 1):
        assign, sums = paths.assign(it), paths.sums(it)
        for s in range(paths.n_shards):
            steps.align_shard(
                paths.shard(s), paths.refs(it - 1), paths.model(it - 1), paths.mask, it, assign[s], sums[s], config
            )
        prev = paths.assign(it - 1) if it > 1 else []
        steps.reconstruct(
            assign, sums, paths.model(it - 1), prev, paths.mask, it, paths.refs(it), paths.model(it), config
        )
        for p in sums:
            Path(p).unlink(missing_ok=True)
    if final_outputs:
        hard = [str(paths.root / "final" / f"hard_{s:04d}.sums.npz") for s in range(paths.n_shards)]
        for s in range(paths.n_shards):
            steps.hard_sums(paths.shard(s), paths.assign(n_iter)[s], hard[s], config)
        steps.write_classes(
            str(paths.root / "preprocess" / "metadata.pkl"),
            paths.info,
            paths.assign(n_iter),
            hard,
            paths.refs(n_iter),
            paths.model(n_iter),
            paths.mask,
            str(paths.root),
            config,
        )
    return paths
