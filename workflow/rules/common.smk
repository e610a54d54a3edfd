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
if workflow.is_main_process:  # before any job: a bad initial model is named now, not after preprocess
    hetrefine.validation.check_initial_models(
        config["initial_models"], skip=hetrefine.config.demo_initial_models(config["demo"])
    )
    # input_poses fixed/local: the align job's own check (the particle file read only then)
    if config["input_poses"] != "ignore" and os.path.isfile(config["particles"]):
        hetrefine.validation.check_input_poses(config["input_poses"], hetrefine.validation.has_poses(
            hetrefine.validation.particle_file_columns(config["particles"])))


# device: gpu without a usable GPU: the align job's own check, before any job (onstart: not
# in a dry run, and only when the jobs run on this machine, not on a cluster's nodes)
onstart:
    if config["device"] == "gpu" and workflow.local_exec:
        hetrefine.backend.select_device("gpu")


N_SHARDS = hetrefine.plan.n_shards(DATA.n_particles, config["shard_size"])
SHARDS = [f"{s:04d}" for s in range(N_SHARDS)]
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


def iteration_sums(wildcards):
    return [L.sums(wildcards.it, s) for s in SHARDS]


def previous_assignments(wildcards):
    """Iteration it-1's alignment results (for the changed fraction); none for it = 1."""
    prev = previous_iteration(wildcards)
    return [L.assignments(prev, s) for s in SHARDS] if prev >= 1 else []


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
# From hetrefine.plan (the pre-flight's model): the refinement box D, the shard
# size n and K; doubled on each retry (`--retries`). A job's memory is bounded by
# the shard size and the box, never by the number of particles.

BOX = config["refine_box"] or DATA.box or 256
INPUT_BOX = DATA.box or BOX
SHARD_N = min(config["shard_size"], DATA.n_particles)
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
    cores = _cores()  # None without --cores: nothing says how much one node holds
    if cores and N_SHARDS <= cores:
        return f"iteration_{wildcards.it}"
    return None


def mem_align(wildcards, attempt):
    est = hetrefine.plan.align_memory_bytes(SHARD_N, BOX, K, N_SHIFTS, N_ROTS)
    return hetrefine.plan.memory_mb(est, attempt)


def mem_reconstruct(wildcards, attempt):
    return hetrefine.plan.memory_mb(hetrefine.plan.reconstruct_memory_bytes(BOX, K), attempt)


def mem_preprocess(wildcards, attempt):
    est = hetrefine.plan.preprocess_memory_bytes(SHARD_N, INPUT_BOX, BOX)
    return hetrefine.plan.memory_mb(est, attempt)


def mem_small(wildcards, attempt):
    return hetrefine.plan.memory_mb(hetrefine.plan.small_memory_bytes(BOX, K), attempt)


def runtime_long(wildcards, attempt):
    """Minutes: align, reconstruct, preprocess."""
    return 120 * attempt


def runtime_short(wildcards, attempt):
    return 30 * attempt
