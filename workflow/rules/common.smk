# Helpers shared by the rules: run layout, shard and iteration lists, input
# functions ("the previous iteration's references"), parameters that trigger
# reruns, and resource estimates. Rules call these by name; no logic in rules.

import hashlib
import math
import os
from pathlib import Path

import hetrefine
import hetrefine.config


# ---------------------------------------------------------------- run layout

RUN = f"results/{config['run']}"
LOGS = f"logs/{config['run']}"
BENCH = f"benchmarks/{config['run']}"

DATA = hetrefine.config.dataset_size(config)
hetrefine.config.check_input_files(config)
N_SHARDS = hetrefine.config.n_shards(DATA.n_particles, config["shard_size"])
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

# The config keys each stage's numbers depend on: a change reruns that stage
# (and, through its outputs, everything downstream). `run` and `device` are
# left out: a device switch gives the same numbers within float32 rounding.
STAGE_KEYS = {
    "demo": ["demo"],
    "preprocess": ["pixel_size", "project_dir", "refine_box", "shard_size", "seed"],
    "mask": ["mask", "particle_diameter_A", "refine_box"],
    "refine": sorted(set(config) - {"run", "device", "demo", "particles", "initial_models"}),
    "plots": [],
}


def settings(stage):
    """The config values that stage `stage` depends on (a dict for `params:`)."""
    return {key: config[key] for key in STAGE_KEYS[stage]}


# ------------------------------------------------------------ file helpers


def output_folder(wildcards, output):
    """The folder of a rule's first output (for steps that write a folder of files)."""
    return os.path.dirname(output[0])


def shard_file(s):
    return f"{RUN}/preprocess/shard_{s}.npz"


def iteration_number(wildcards):
    """The iteration as an int (1..N) from the zero-padded `{it}` wildcard."""
    return int(wildcards.it)


def previous_iteration(wildcards):
    return f"{int(wildcards.it) - 1:03d}"


def previous_references(wildcards):
    """Iteration it uses the references written by iteration it-1 (iter_000 = init)."""
    return f"{RUN}/iter_{previous_iteration(wildcards)}/references.npz"


def previous_model(wildcards):
    return f"{RUN}/iter_{previous_iteration(wildcards)}/model.json"


def iteration_assignments(wildcards):
    """Every shard's alignment result of iteration `it` (gathered by reconstruct)."""
    return [f"{RUN}/iter_{wildcards.it}/align/shard_{s}.npz" for s in SHARDS]


def iteration_sums(wildcards):
    return [f"{RUN}/iter_{wildcards.it}/align/shard_{s}.sums.npz" for s in SHARDS]


def previous_assignments(wildcards):
    """Iteration it-1's alignment results (for the changed fraction); none for it = 1."""
    prev = int(wildcards.it) - 1
    if prev < 1:
        return []
    return [f"{RUN}/iter_{prev:03d}/align/shard_{s}.npz" for s in SHARDS]


def final_assignments():
    return [f"{RUN}/iter_{LAST}/align/shard_{s}.npz" for s in SHARDS]


def all_models():
    return [f"{RUN}/iter_{it:03d}/model.json" for it in range(N_ITER + 1)]


def all_references():
    return [f"{RUN}/iter_{it:03d}/references.npz" for it in range(N_ITER + 1)]


CLASS_FILES = [
    "particles.star",
    "map.mrc",
    "map_half_A.mrc",
    "map_half_B.mrc",
    "map_hard.mrc",
    "mask.mrc",
    "fsc.csv",
]


def class_outputs():
    return [f"{RUN}/class_{k}/{name}" for k in CLASSES for name in CLASS_FILES]


def plot_files(name, ext):
    """`plots/<name>.<ext>`, or one per class when `name` has a `{k}` field."""
    if "{k}" in name:
        return [f"{RUN}/plots/{name.format(k=k)}.{ext}" for k in CLASSES]
    return f"{RUN}/plots/{name}.{ext}"


PLOTS = [
    "class_sizes",
    "changed_fraction",
    "resolution",
    "posterior_hist",
    "slices",
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
    files = [f"{RUN}/particles_all.star", f"{RUN}/particles_all.cs", f"{RUN}/volumes_all.zip", *class_outputs()]
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
# Estimates from the config (the refinement box D, the shard size n and the
# number of classes K), doubled on each retry (`--retries`). A job's memory is
# bounded by the shard size and the box, never by the number of particles.

BOX = config["refine_box"] or DATA.box or 256
SHARD_N = min(config["shard_size"], DATA.n_particles)


def _mb(n_bytes):
    return int(math.ceil(n_bytes / 2**20))


def shard_threads(wildcards):
    """Threads per align/hard_sums job: the shards are the unit of parallelism (most of
    an align job is single-threaded numpy), so one thread each when there are at
    least as many shards as cores; otherwise share the cores out, at most 4.

    Under a cluster executor there is no total (`--cores` unset; Snakemake 9 refuses
    `workflow.cores` then): each shard is a job of its own and asks for 4, cut to
    the profile's `max-threads` (the CPUs a node of the partition offers)."""
    from snakemake.exceptions import WorkflowError

    try:
        cores = workflow.cores
    except WorkflowError:  # no --cores: a cluster executor
        return 4
    cores = cores if isinstance(cores, int) else 1
    return max(1, min(4, cores // max(1, N_SHARDS)))


def iteration_group(wildcards):
    """The cluster job an align/reconstruct job belongs to (Snakemake `group:`).

    When every shard of an iteration fits one node at once (shards <= the
    profile's `cores`), the iteration is one cluster job: its aligns in parallel,
    then its reconstruct, so it pays the queue and Snakemake's start-up once, not
    once per shard. With more shards than that, each job is its own (grouping
    would run the shards on one node one after another). Local runs ignore it."""
    from snakemake.exceptions import WorkflowError

    try:
        cores = workflow.cores
    except WorkflowError:  # no --cores: nothing says how much one node holds
        return None
    if isinstance(cores, int) and N_SHARDS <= cores:
        return f"iteration_{wildcards.it}"
    return None


def mem_align(wildcards, attempt):
    """Shard images (real + Fourier), K x 2 half-maps padded 2x (complex64), work space."""
    images = SHARD_N * BOX**2 * 4 * 6
    maps = K * 2 * (2 * BOX) ** 3 * 8 * 2
    return (1024 + _mb(images + maps)) * attempt


def mem_reconstruct(wildcards, attempt):
    """Two running sums (numerator complex64 + weight float32) per class and half, padded 2x."""
    sums = K * 2 * (2 * BOX) ** 3 * 12 * 3
    return (1024 + _mb(sums)) * attempt


def mem_preprocess(wildcards, attempt):
    """One shard of input images at the input box plus the cropped copy."""
    box = DATA.box or BOX
    return (1024 + _mb(SHARD_N * box**2 * 4 * 6)) * attempt


def mem_small(wildcards, attempt):
    return (1024 + _mb(K * 2 * BOX**3 * 4 * 4)) * attempt


def runtime_long(wildcards, attempt):
    """Minutes: align, reconstruct, preprocess."""
    return 120 * attempt


def runtime_short(wildcards, attempt):
    return 30 * attempt
