"""One thin module per workflow rule: its declared inputs -> the kernel -> its declared outputs.

:data:`SETTINGS` names, for each step, the config keys it reads: exactly its
rule's rerun triggers (``workflow/rules/common.smk`` puts these, and only
these, into the rule's ``params``), and the step receives them as a
:class:`Settings` mapping that refuses any other key. ``device`` is passed on
its own: it chooses the machine, not the numbers (CPU and GPU agree within
float32 rounding), so changing it reruns nothing. Files are read and written
through ``hetrefine.io.run_files``. The modules never know about Snakemake; the
scripts in ``scripts/`` call them through ``hetrefine.cli``.

This module imports nothing heavy: the scripts read the table before numpy is
imported (thread caps).

    demo             simulate the demo data set
    preprocess       particles -> shards, metadata, info, sample
    mask             soft spherical mask, focused mask (mask.file)
    init_references  initial models -> iteration 0's references and statistics
    align            one shard (its chunks in turn) against the previous references -> assignments, sums
    reduce_sums      a few sums files -> their sum (the sums tree)
    reconstruct      the shards' (reduced) sums -> this iteration's references and statistics
    hard_sums        one shard's hard-assignment sums (final maps)
    write_classes    the user-facing files (STAR, .cs, maps, zip)
    plots            every figure
"""

from __future__ import annotations

from collections.abc import Mapping

SETTINGS: dict[str, tuple[str, ...]] = {
    "demo": ("demo",),
    "preprocess": (
        "pixel_size",
        "project_dir",
        "refine_box",
        "shard_size",
        "seed",
        "particle_diameter_A",
    ),
    "mask": ("mask", "particle_diameter_A"),
    "init_references": (
        "initial_lowpass_A",
        "particle_diameter_A",
        "seed",
        "max_resolution_A",
        # a same-map start aligns a sample as iteration 1 will (starts.same_map_fit_cuts)
        "coarse_angle_step_deg",
        "local_refine_levels",
        "shift_range_px",
        "shift_step_px",
        "per_particle_scale",
        "symmetry",
        "same_map_fsc",
    ),
    "align": (
        "input_poses",
        "online_em_iterations",
        "batch_size_per_class",
        "seed",
        "coarse_angle_step_deg",
        "local_refine_levels",
        "shift_range_px",
        "shift_step_px",
        "per_particle_scale",
        "symmetry",
        "class_similarity",
        "class_similarity_anneal_iterations",
        "random_assignment_iterations",
        "classification",
        "mask",
        "self_evidence_correction",
        "class_evidence",
        "class_evidence_full_share",
    ),
    "reconstruct": (
        "online_em_decay",
        "online_em_iterations",
        "symmetry",
        "tau2_fudge",
        "max_resolution_A",
        # the convergence rule (hetrefine.convergence)
        "stop_when_converged",
        "convergence_changed_fraction",
        "random_assignment_iterations",
        "class_similarity_anneal_iterations",
    ),
    "reduce_sums": (),
    "hard_sums": ("junk_fit_score",),
    "write_classes": (
        "symmetry",
        "tau2_fudge",
        "particle_diameter_A",
        "junk_fit_score",
        "self_evidence_correction",  # the reported posteriors are then not tempered
    ),
    "plots": ("*",),  # the summary page records the run's config: every key but MACHINE_KEYS
}
"""The config keys each step reads (its rule's rerun triggers); ``("*",)``: all of them
except :data:`MACHINE_KEYS`."""

MACHINE_KEYS = ("run", "device", "workers")
"""Keys that choose where and under which name a run goes, not its numbers: no step's trigger.
``workers`` (how many align jobs share an iteration with ``shard_size: auto``) changes the
shards, hence the order in which the chunks' sums are added: float32 rounding, not results."""


class Settings(Mapping):
    """The config values one step reads, and only those (a read-only mapping).

    Reading a key that is not among them would make the step depend on a key that
    does not rerun it: it raises KeyError saying so.
    """

    def __init__(self, values: Mapping, step: str):
        self._step = step
        self._values = {k: values[k] for k in step_keys(step, values)}

    def __getitem__(self, key):
        if key not in self._values:
            raise KeyError(
                f"step '{self._step}' read config key '{key}', which is not among its settings "
                f"{sorted(self._values)}; add it to hetrefine.steps.SETTINGS (its rerun triggers)"
            )
        return self._values[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Settings({self._step}: {self._values!r})"


def step_keys(step: str, config: Mapping) -> list[str]:
    """The keys of ``config`` step ``step`` reads (its rerun triggers), in order."""
    keys = SETTINGS[step]
    if keys == ("*",):
        return sorted(k for k in config if k not in MACHINE_KEYS)
    return list(keys)


def settings_for(step: str, config: Mapping) -> Settings:
    """Step ``step``'s :class:`Settings` from a full (validated) config."""
    return Settings(config, step)
