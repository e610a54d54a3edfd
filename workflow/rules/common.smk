# Helpers shared by the rules: the run layout (hetrefine.io.run_files), shard and
# iteration lists, input functions ("the previous iteration's references"), each
# rule's settings (its rerun triggers, hetrefine.steps.SETTINGS) and resources
# (hetrefine.plan, the model the pre-flight uses too). Rules call these by name.

import hashlib
import os
from pathlib import Path

import hetrefine
import hetrefine.backend
import hetrefine.config
import hetrefine.plan
import hetrefine.steps
import hetrefine.validation
import hetrefine.workflow_locks
from hetrefine.io.run_files import RunLayout


# ---------------------------------------------------------------- stale locks
# A run killed with SIGKILL leaves .snakemake/locks behind: removed when no other
# Snakemake runs in this folder on this machine (hetrefine.workflow_locks).

if workflow.is_main_process:
    hetrefine.workflow_locks.remove_stale_lock(".")


# ---------------------------------------------------------------- run layout

RUN = f"results/{config['run']}"
LOGS = f"logs/{config['run']}"
BENCH = f"benchmarks/{config['run']}"
L = RunLayout(RUN)

DATA = hetrefine.config.dataset_size(config)
hetrefine.config.check_input_files(config)
if workflow.is_main_process:  # before any job: a folder it cannot write is named now
    hetrefine.validation.check_writable(RUN)
hetrefine.validation.check_online_em(
    config["iterations"],
    config["online_em_iterations"],
    config["batch_size_per_class"],
    len(config["initial_models"]),
    DATA.n_particles,
)
if workflow.is_main_process:  # before any job: a bad initial model is named now, not after preprocess
    hetrefine.validation.check_initial_models(
        config["initial_models"], skip=hetrefine.config.demo_initial_models(config["demo"])
    )
    if config["mask"]["file"]:  # the focused mask: checked as the mask step checks it
        hetrefine.validation.read_focus_mask(config["mask"]["file"])
    # input_poses fixed/local: the align job's own check (the particle file read only then)
    if config["input_poses"] != "ignore" and os.path.isfile(config["particles"]):
        hetrefine.validation.check_input_poses(config["input_poses"], hetrefine.validation.has_poses(
            hetrefine.validation.particle_file_columns(config["particles"])))


# device: gpu without a usable GPU: the align job's own check, before any job (onstart: not
# in a dry run, and only when the jobs run on this machine, not on a cluster's nodes)
onstart:
    if config["device"] == "gpu" and workflow.local_exec:
        hetrefine.backend.select_device("gpu")


# Shards (align jobs per iteration) from config values only: the profile's `workers`,
# never the node a job lands on, so every parse of this file on a cluster plans the same
# shards. Preprocess writes chunks; an align job streams its shard's chunks.
SHARD_SIZE = config["shard_size"]
WORKERS = config["workers"]
N_CHUNKS = hetrefine.plan.n_chunks(DATA.n_particles, SHARD_SIZE)
N_SHARDS = hetrefine.plan.n_shards(DATA.n_particles, SHARD_SIZE, WORKERS)
SHARDS = [f"{s:04d}" for s in range(N_SHARDS)]
# the sums tree: files per level above the shards' sums (none when they are few)
SUMS_LEVELS = hetrefine.plan.reduce_levels(N_SHARDS)
N_ITER = config["iterations"]
LAST = f"{N_ITER:03d}"
K = len(config["initial_models"])
CLASSES = [f"{k:03d}" for k in range(1, K + 1)]


# ------------------------------------------------------ rerun on kernel edits


def kernel_version():
    """Package version plus a hash of the kernel's sources (src/hetrefine/**/*.py).

    Snakemake does not see edits to the package; putting this string in the
    params of every kernel-backed rule makes a changed kernel rerun its jobs.
    """
    root = Path(hetrefine.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return f"{hetrefine.__version__}+{digest.hexdigest()[:12]}"


KERNEL = kernel_version()


def settings(step):
    """The config values step `step` reads (a dict for `params:`): its rerun triggers."""
    return {key: config[key] for key in hetrefine.steps.step_keys(step, config)}


# ------------------------------------------------------------ file helpers


def user_mask_file(wildcards):
    """mask.file, when given: an input of make_mask, so a changed mask file reruns it."""
    return [config["mask"]["file"]] if config["mask"]["file"] else []


def solvent_mask_models(wildcards):
    """The initial models, when the solvent mask is built from them (mask.solvent without
    mask.file): an input of make_mask."""
    m = config["mask"]
    return list(config["initial_models"]) if m["solvent"] and not m["file"] else []


def output_folder(wildcards, output):
    """The folder of a rule's first output (for steps that write a folder of files)."""
    return os.path.dirname(output[0])


def run_folder(wildcards):
    """The run folder (results/<run>), where write_classes puts its files."""
    return RUN


def plots_folder(wildcards, output):
    """The folder of the plots rule's figures."""
    return os.path.dirname(output.class_sizes)


def iteration_number(wildcards):
    """The iteration as an int (1..N) from the zero-padded `{it}` wildcard."""
    return int(wildcards.it)


def previous_iteration(wildcards):
    return int(wildcards.it) - 1


def previous_references(wildcards):
    """Iteration it uses the references written by iteration it-1 (iter_000 = init)."""
    return L.references(previous_iteration(wildcards))


def previous_model(wildcards):
    return L.model(previous_iteration(wildcards))


def iteration_assignments(wildcards):
    """Every shard's alignment result of iteration `it` (gathered by reconstruct)."""
    return [L.assignments(wildcards.it, s) for s in SHARDS]


def all_chunks():
    """Every preprocessed chunk file, in order (preprocess writes them)."""
    return [L.chunk(c) for c in range(N_CHUNKS)]


def shard_chunks(wildcards):
    """The chunk files shard `s` aligns, in order (hetrefine.plan.shard_chunks)."""
    chunks = hetrefine.plan.shard_chunks(int(wildcards.s), DATA.n_particles, SHARD_SIZE, WORKERS)
    return [L.chunk(c) for c in chunks]


def sums_leaves(stage):
    """The shards' sums files of a stage: `iter_XXX` (align) or `final` (hard_sums)."""
    if stage == "final":
        return [L.hard_sums(s) for s in SHARDS]
    return [L.sums(stage.removeprefix("iter_"), s) for s in SHARDS]


def top_sums(stage):
    """What the reader of a stage's sums takes: the top level of its sums tree (at most
    hetrefine.plan.SUMS_FAN_IN files), or the shards' files when they are that few."""
    if not SUMS_LEVELS:
        return sums_leaves(stage)
    return [L.tree_sums(stage, len(SUMS_LEVELS), j) for j in range(SUMS_LEVELS[-1])]


def tree_children(wildcards):
    """The files one reduce_sums job adds: its children on the level below."""
    level = int(wildcards.level)
    if level == 1:
        below = sums_leaves(wildcards.stage)
    else:
        below = [L.tree_sums(wildcards.stage, level - 1, j) for j in range(SUMS_LEVELS[level - 2])]
    return [below[i] for i in hetrefine.plan.reduce_children(int(wildcards.node), len(below))]


def iteration_sums(wildcards):
    """The sums reconstruct reads: the shards' files or the top of their tree."""
    return top_sums(L.iteration_stage(wildcards.it))


def final_hard_sums():
    return top_sums("final")


def previous_assignments(wildcards):
    """Iteration it-1's alignment results (for the changed fraction); none for it = 1."""
    prev = previous_iteration(wildcards)
    return [L.assignments(prev, s) for s in SHARDS] if prev >= 1 else []


def previous_shard_assignments(wildcards):
    """Shard s's alignment result of iteration it-1 (none for it = 1): what align writes
    again once the run has stopped (hetrefine.convergence)."""
    prev = previous_iteration(wildcards)
    return [L.assignments(prev, wildcards.s)] if prev >= 1 else []


def final_assignments():
    return [L.assignments(LAST, s) for s in SHARDS]


def all_models():
    return [L.model(it) for it in range(N_ITER + 1)]


def all_references():
    return [L.references(it) for it in range(N_ITER + 1)]


CLASS_FILES = [
    "particles.star",
    "particles.cs",
    "map.mrc",
    "map_half_A.mrc",
    "map_half_B.mrc",
    "map_hard.mrc",
    "mask.mrc",
    "fsc.csv",
    "resolution.json",
    "angdist.bild",
]


def full_box_maps():
    """Per class, the map and half-maps at the particles' own box and pixel size, written
    when the refinement box is smaller than the particle box."""
    if not (DATA.box and BOX < DATA.box):
        return []
    names = ["map_full_box.mrc", "map_half_A_full_box.mrc", "map_half_B_full_box.mrc"]
    return [f"{L.class_dir(k)}/{name}" for k in CLASSES for name in names]


def class_outputs():
    return [f"{L.class_dir(k)}/{name}" for k in CLASSES for name in CLASS_FILES] + full_box_maps()


def class_orientations():
    return [f"{L.class_dir(k)}/orientations.png" for k in CLASSES]


def plot_files(name, ext):
    """`plots/<name>.<ext>`, or one per class when `name` has a `{k}` field."""
    if "{k}" in name:
        return [L.plot(name.format(k=k), ext) for k in CLASSES]
    return L.plot(name, ext)


PLOTS = [
    "class_sizes",
    "changed_fraction",
    "resolution",
    "posterior_hist",
    "fit_score_hist",
    "slices",
    "fsc_all",
    "fsc_class_{k}",
    "orientations_class_{k}",
]


def plot_svgs():
    """The SVG twin of every PNG plot (byte-stable vector versions)."""
    files = []
    for name in PLOTS:
        more = plot_files(name, "svg")
        files += more if isinstance(more, list) else [more]
    return files


def final_outputs():
    """Everything the target `all` asks for: the class outputs and every plot."""
    files = [f"{RUN}/particles_all.star", f"{RUN}/particles_all.cs", f"{RUN}/volumes_all.zip"]
    files += class_outputs() + class_orientations()
    for name in PLOTS:
        more = plot_files(name, "png")
        files += more if isinstance(more, list) else [more]
    return files + plot_svgs()


def simulate_demo_outputs():
    return hetrefine.config.demo_initial_models(config["demo"])


def demo_truth_maps():
    n = config["demo"]["n_classes"]
    return [f"{hetrefine.config.DEMO_DIR}/truth_class_{k:02d}.mrc" for k in range(1, n + 1)]


def align_env():
    """The CuPy environment for align when the config asks for the GPU."""
    if config["device"] == "gpu":
        return "../../envs/kernel-gpu.yaml"
    return "../../envs/kernel.yaml"


# ---------------------------------------------------------------- resources
# From hetrefine.plan (the pre-flight's model): the refinement box D, the chunk
# size n and K; doubled on each retry (`--retries`). A job's memory is bounded by
# the chunk size and the box, never by the number of particles or the shard.

BOX = config["refine_box"] or DATA.box or 256
# the largest images preprocess reads (optics groups may have larger boxes than DATA.box)
INPUT_BOX = hetrefine.config.largest_image_box(config) or DATA.box or BOX
CHUNK_N = min(hetrefine.plan.chunk_size(SHARD_SIZE), DATA.n_particles)  # what a job holds
SHARD_N = hetrefine.plan.shard_particles(DATA.n_particles, SHARD_SIZE, WORKERS)
N_SHIFTS = hetrefine.plan.n_shift_points(config["shift_range_px"], config["shift_step_px"])
N_ROTS = hetrefine.plan.n_rotations(config["coarse_angle_step_deg"], config["symmetry"])


def _cores():
    """--cores of a local run; None under a cluster executor (Snakemake 9 refuses to
    give workflow.cores when --cores is not set)."""
    try:
        cores = workflow.cores
    except Exception:
        return None
    return cores if isinstance(cores, int) else None


def shard_threads(wildcards):
    """Threads per align/hard_sums job (hetrefine.plan.shard_threads): under a cluster
    executor (no --cores) each shard is a job of its own and asks for the most an align
    job uses, cut to the profile's `cores`/`max-threads`."""
    return hetrefine.plan.shard_threads(_cores(), N_SHARDS)


def iteration_group(wildcards):
    """The cluster job an align/reconstruct job belongs to (Snakemake `group:`).

    When every shard of an iteration fits one node at once (shards <= the
    profile's `cores`), the iteration is one cluster job: its aligns in parallel,
    then its reconstruct, so it pays the queue and Snakemake's start-up once, not
    once per shard. With more shards than that, each job is its own (grouping
    would run the shards on one node one after another). Local runs ignore it."""
    return _iteration_group(wildcards.it)


def _iteration_group(it):
    cores = _cores()  # None without --cores: nothing says how much one node holds
    if cores and N_SHARDS <= cores:
        return f"iteration_{it}"
    return None


def sums_group(wildcards):
    """A reduce_sums job of an iteration joins that iteration's group (iteration_group)."""
    if wildcards.stage == "final":
        return None
    return _iteration_group(wildcards.stage.removeprefix("iter_"))


def mem_align(wildcards, attempt):
    est = hetrefine.plan.align_memory_bytes(CHUNK_N, BOX, K, N_SHIFTS, N_ROTS, n_results=SHARD_N)
    return hetrefine.plan.memory_mb(est, attempt)


def mem_reduce(wildcards, attempt):
    return hetrefine.plan.memory_mb(hetrefine.plan.reduce_memory_bytes(BOX, K), attempt)


def mem_reconstruct(wildcards, attempt):
    return hetrefine.plan.memory_mb(hetrefine.plan.reconstruct_memory_bytes(BOX, K), attempt)


def mem_preprocess(wildcards, attempt):
    est = hetrefine.plan.preprocess_memory_bytes(CHUNK_N, INPUT_BOX, BOX)
    return hetrefine.plan.memory_mb(est, attempt)


def mem_small(wildcards, attempt):
    return hetrefine.plan.memory_mb(hetrefine.plan.small_memory_bytes(BOX, K), attempt)


def runtime_long(wildcards, attempt):
    """Minutes: align, reconstruct, preprocess."""
    return 120 * attempt


def runtime_short(wildcards, attempt):
    return 30 * attempt
