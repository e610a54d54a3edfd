"""The Snakemake workflow: lint, static DAG shape, config errors, profiles, envs, README/CI.

Every run happens in a copy of the workflow in ``tmp_path`` (``python -m snakemake``
in a subprocess), so the checkout's ``results/`` is never touched.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = ["Snakefile", "config.yaml", "workflow", "profiles", "envs", "scripts"]
README_RE = re.compile(r"## Quick start\n(.*?)\n## ", re.S)


def copy_workflow(dest: Path) -> Path:
    """A copy of the workflow (not the package) in ``dest`` (test_faults and test_slurm use it too)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture
def wd(tmp_path: Path) -> Path:
    """A copy of the workflow (not the package) in a temporary folder."""
    return copy_workflow(tmp_path)


def smk(wd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m snakemake`` on the copy in ``wd``; stdout and stderr merged."""
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(wd / "Snakefile"), *args],
        cwd=wd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


def overrides(wd: Path, **config) -> list[str]:
    """A second config file (nested keys merge into config.yaml), as snakemake arguments."""
    path = wd / "overrides.yaml"
    path.write_text(yaml.safe_dump(config))
    return ["--configfile", str(path)]


def job_stats(output: str) -> dict[str, int]:
    """The "Job stats" table of a dry run as {rule: count}."""
    table = output.split("Job stats:", 1)[1]
    counts = {}
    for line in table.splitlines()[3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        counts[parts[0]] = int(parts[1])
    return counts


def jobs(output: str, rule: str) -> list[dict[str, str]]:
    """Each job of ``rule`` in a dry run's listing, as {field: value} (input, output, resources...)."""
    found = []
    # Jobs inside a group job (align and reconstruct of one iteration) are indented.
    for block in re.split(r"\n(?=[ \t]*\[[^\]]+\]\n[ \t]*(?:local)?rule )", output):
        m = re.search(rf"^[ \t]*(?:local)?rule {rule}:\n", block, re.M)
        if not m:
            continue
        fields = dict(re.findall(r"^[ \t]+(\w+): (.*)$", block[m.end() :], re.M))
        found.append(fields)
    return found


def test_lint_is_clean(wd):
    result = smk(wd, "--lint")
    assert result.returncode == 0, result.stdout
    assert "Lints for" not in result.stdout


@pytest.mark.parametrize(
    ("iterations", "n_particles", "shard_size"),
    [(2, 1000, 1000), (5, 1000, 250), (3, 1001, 500)],
)
def test_dry_run_job_counts(wd, iterations, n_particles, shard_size):
    n_shards = -(-n_particles // shard_size)
    result = smk(
        wd,
        "-n",
        *overrides(
            wd, iterations=iterations, shard_size=shard_size, demo={"n_particles": n_particles}
        ),
    )
    assert result.returncode == 0, result.stdout
    assert job_stats(result.stdout) == {
        "simulate_demo": 1,
        "preprocess": 1,
        "make_mask": 1,
        "init_references": 1,
        "align": iterations * n_shards,
        "reconstruct": iterations,
        "hard_sums": n_shards,
        "write_classes": 1,
        "plots": 1,
        "all": 1,
        "total": 7 + iterations * (n_shards + 1) + n_shards,
    }
    # iteration i aligns against iteration i-1's references; reconstruct gathers every shard
    assert len(jobs(result.stdout, "align")) == iterations * n_shards
    assert len(jobs(result.stdout, "reconstruct")) == iterations
    for job in jobs(result.stdout, "align"):
        it = int(re.search(r"it=(\d{3})", job["wildcards"]).group(1))
        assert f"iter_{it - 1:03d}/references.npz" in job["input"]
        assert f"iter_{it:03d}/align/" in job["output"]
    for job in jobs(result.stdout, "reconstruct"):
        it = int(re.search(r"it=(\d{3})", job["wildcards"]).group(1))
        assert job["input"].count(".sums.npz") == n_shards
        assert job["input"].count(f"iter_{it - 1:03d}/align/") == (n_shards if it > 1 else 0)
    assert not (wd / "results").exists()


def test_large_dag_builds_quickly(wd):
    """20 iterations x 100 shards: 2000 align jobs planned within a generous bound."""
    start = time.perf_counter()
    result = smk(
        wd,
        "-n",
        "--quiet",
        "rules",
        *overrides(wd, iterations=20, shard_size=10, demo={"n_particles": 1000}),
    )
    elapsed = time.perf_counter() - start
    print(f"\n20 iterations x 100 shards: dry run in {elapsed:.1f} s")
    assert result.returncode == 0, result.stdout[-3000:]
    assert job_stats(result.stdout)["align"] == 2000
    assert elapsed < 240


@pytest.mark.parametrize(
    ("config", "fragments"),
    [
        ({"itterations": 3}, ["unknown key 'itterations'", "did you mean 'iterations'"]),
        ({"iterations": "three"}, ["key 'iterations'", "is not of type 'integer'"]),
        (
            {"mask": {"inner_diameter_A": 100, "outer_diameter_A": 80}},
            ["key 'mask.outer_diameter_A'", "smaller than its inner diameter"],
        ),
        (
            {"initial_models": ["results/demo_data/initial_model_01.mrc"]},
            ["key 'initial_models'", "at least 2 initial models"],
        ),
        ({"refine_box": 31}, ["key 'refine_box'", "must be even"]),
        ({"refine_box": 64}, ["key 'refine_box'", "larger than the particle box (48 px)"]),
        ({"particles": "nowhere.star"}, ["nowhere.star", "does not exist"]),
        (
            {"initial_models": ["results/demo_data/initial_model_01.mrc", "mine.mrc"]},
            ["mine.mrc", "initial model does not exist"],
        ),
    ],
)
def test_config_errors_stop_before_any_job(wd, config, fragments):
    result = smk(wd, "-n", *overrides(wd, **config))
    assert result.returncode != 0
    for fragment in fragments:
        assert fragment in result.stdout, result.stdout
    assert "InputError" in result.stdout
    assert "Job stats" not in result.stdout
    assert not (wd / "results").exists()


def test_command_line_overrides(wd):
    result = smk(wd, "-n", "--config", "iterations=1", "refine_box=null", "shard_size=600")
    assert result.returncode == 0, result.stdout
    assert job_stats(result.stdout)["align"] == 2


def conda_envs() -> dict[Path, set[str]]:
    """Every env file a rule names: {path: rules}, from the `conda:` directives and align_env()."""
    found: dict[Path, set[str]] = {}
    common = (ROOT / "workflow/rules/common.smk").read_text()
    align_envs = re.findall(r'return "(\.\./\.\./envs/[^"]+)"', common)
    assert len(align_envs) == 2
    for smk_file in sorted((ROOT / "workflow/rules").glob("*.smk")):
        text = smk_file.read_text()
        for rule, body in re.findall(r"^rule (\w+):\n(.*?)(?=^rule |\Z)", text, re.S | re.M):
            m = re.search(r"^    conda:\n        (.+)$", body, re.M)
            assert m, f"rule {rule} has no conda: directive"
            value = m.group(1).strip()
            paths = align_envs if value == "align_env()" else [value.strip('"')]
            for rel in paths:
                found.setdefault((smk_file.parent / rel).resolve(), set()).add(rule)
    return found


def test_every_rule_has_an_env_that_parses():
    envs = conda_envs()
    assert {p.name for p in envs} == {p.name for p in (ROOT / "envs").glob("*.yaml")}
    for path in envs:
        assert path.is_file(), path
        env = yaml.safe_load(path.read_text())
        assert env["channels"][0] == "conda-forge"
        deps = [d for d in env["dependencies"] if isinstance(d, str)]
        names = {re.split(r"[<>=! ]", d)[0] for d in deps}
        assert {"python", "numpy", "scipy", "mrcfile", "starfile", "pip"} <= names, path
        assert (path.parent / f"{path.stem}.post-deploy.sh").is_file()
    gpu = yaml.safe_load((ROOT / "envs/kernel-gpu.yaml").read_text())
    assert any(str(d).startswith("cupy") for d in gpu["dependencies"])


def test_every_rule_is_complete():
    """Named input/output, log, benchmark, resources, threads and the kernel version in params."""
    rules = 0
    for smk_file in sorted((ROOT / "workflow/rules").glob("*.smk")):
        text = smk_file.read_text()
        for rule, body in re.findall(r"^rule (\w+):\n(.*?)(?=^rule |\Z)", text, re.S | re.M):
            rules += 1
            for directive in ("output", "log", "benchmark", "resources", "threads", "script"):
                assert f"    {directive}:" in body, f"rule {rule} lacks {directive}:"
            assert "kernel=KERNEL" in body, f"rule {rule} does not depend on the kernel version"
            assert "lambda" not in body
            script = re.search(r'script:\n\s+"([^"]+)"', body).group(1)
            assert (smk_file.parent / script).resolve().is_file()
    assert rules == 11  # 10 pipeline steps + preflight


def test_local_profile_dry_run(wd):
    result = smk(wd, "-n", "--profile", "workflow/profiles/local")
    assert result.returncode == 0, result.stdout
    assert all("gpu" not in job["resources"] for job in jobs(result.stdout, "align"))


def test_slurm_gpu_profile_asks_a_gpu_for_align_only(wd):
    profile = yaml.safe_load((ROOT / "workflow/profiles/slurm-gpu/config.yaml").read_text())
    assert profile["executor"] == "slurm"
    assert profile["set-resources"]["align"]["gres"] == "gpu:1"
    assert "gres" not in profile.get("default-resources", {})
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        pytest.skip("snakemake-executor-plugin-slurm is not installed (profile YAML checked)")
    result = smk(wd, "-n", "--profile", "workflow/profiles/slurm-gpu")
    assert result.returncode == 0, result.stdout
    # Each job's rule and resources; align and reconstruct sit indented in group jobs.
    listed = re.findall(
        r"^\s*(?:local)?rule (\w+):\n(?:\s+\w+: .*\n)*?\s+resources: (.*)$", result.stdout, re.M
    )
    align = [res for rule, res in listed if rule == "align"]
    assert len(align) == 16
    from hetrefine import plan

    # the request is the memory model the pre-flight prints (demo: chunks and shards of 500
    # at box 48, K=2)
    want = plan.memory_mb(
        plan.align_memory_bytes(
            500, 48, 2, plan.n_shift_points(3, 1), plan.n_rotations(15), n_results=500
        )
    )
    for res in align:
        assert "gres=gpu:1" in res
        assert int(re.search(r"mem_mb=(\d+)", res).group(1)) == want
    for rule, res in listed:
        if rule != "align":
            assert "gres=" not in res, (rule, res)
    assert {rule for rule, _ in listed} >= {"reconstruct", "preprocess", "write_classes"}


def quick_start() -> list[str]:
    section = README_RE.search((ROOT / "README.md").read_text()).group(1)
    return re.findall(r"```bash\n(.*?)\n```", section, re.S)


def test_readme_quick_start_is_two_single_lines():
    commands = quick_start()
    assert len(commands) == 2
    for command in commands:
        assert "\n" not in command
        assert command.startswith("python3 -m venv .venv && .venv/bin/pip install -e ")
    assert commands[0].endswith(".venv/bin/snakemake --cores 2")
    assert commands[1].endswith(".venv/bin/python -m pytest -q")


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci/run").read_text()
    assert ci.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in ci
    assert os.access(ROOT / ".ci/run", os.X_OK)
    assert quick_start()[1] in ci.splitlines()


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "scripts").glob("*.py")))
def test_scripts_have_a_command_line(script):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and "--config" in result.stdout
    assert len((ROOT / "scripts" / script).read_text().splitlines()) <= 40


STUB_STEPS = '''
"""Stand-in for the step modules: checks what the scripts pass, writes placeholder outputs."""
import json
import logging
import os
from pathlib import Path

log = logging.getLogger("hetrefine.steps")


def _write(path, text="stub"):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)


def _inputs(*paths):
    for path in paths:
        assert os.path.isfile(path), path


def simulate_demo(out_dir, settings):
    demo = settings["demo"]
    for name in ("particles.star", "particles.mrcs", "truth.csv"):
        _write(f"{out_dir}/{name}")
    for k in range(1, demo["n_classes"] + 1):
        _write(f"{out_dir}/truth_class_{k:02d}.mrc")
    for k in range(1, demo["n_classes"] + 1 + int(demo["decoy"])):
        _write(f"{out_dir}/initial_model_{k:02d}.mrc")
    log.info("stub simulate_demo %s", out_dir)


def preprocess(particles, out_info, out_metadata, out_sample, out_chunks, settings):
    _inputs(particles)
    assert isinstance(out_chunks, list) and len(out_chunks) >= 1
    _write(out_info, json.dumps({"n_chunks": len(out_chunks)}))
    for path in (out_metadata, out_sample, *out_chunks):
        _write(path)
    log.info("stub preprocess %d chunks", len(out_chunks))


def make_mask(info, out_mask, out_focus_mask, models, settings):
    _inputs(info, *models)
    _write(out_mask)
    _write(out_focus_mask)


def init_references(models, info, sample, mask, out_refs, out_model, settings):
    assert isinstance(models, list) and len(models) >= 2
    _inputs(*models, info, sample, mask)
    _write(out_refs)
    _write(out_model)


def align_chunks(chunks, refs, model, mask, focus_mask, prev_assign, iteration, out_assign, out_sums,
                 settings, device="auto"):
    assert isinstance(iteration, int) and iteration >= 1
    assert f"iter_{iteration - 1:03d}" in refs and f"iter_{iteration:03d}" in out_assign
    assert isinstance(chunks, list) and len(chunks) >= 1
    assert len(prev_assign) == (0 if iteration == 1 else 1)
    assert all(f"iter_{iteration - 1:03d}" in p for p in prev_assign)
    _inputs(*chunks, refs, model, mask, focus_mask, *prev_assign)
    _write(out_assign)
    _write(out_sums)
    log.info("stub align iteration %d", iteration)


def reduce_sums(sums, out_sums, settings):
    assert isinstance(sums, list) and 1 <= len(sums) <= 8
    _inputs(*sums)
    _write(out_sums)


def reconstruct(assign, sums, prev_model, prev_refs, prev_assign, mask, iteration, out_refs, out_model, settings):
    assert isinstance(assign, list) and 1 <= len(sums) <= min(len(assign), 8)
    assert len(prev_assign) == (0 if iteration == 1 else len(assign))
    _inputs(*assign, *sums, *prev_assign, prev_model, prev_refs, mask)
    _write(out_refs)
    _write(out_model)


def hard_sums(chunks, assign, model, out_sums, settings, device="auto"):
    _inputs(*chunks, assign, model)
    _write(out_sums)


def write_classes(metadata, info, assign, hard_sums, refs, model, mask, out_dir, settings):
    assert 1 <= len(hard_sums) <= min(len(assign), 8)
    _inputs(metadata, info, *assign, *hard_sums, refs, model, mask)
    _write(f"{out_dir}/particles_all.star")
    _write(f"{out_dir}/particles_all.cs")
    _write(f"{out_dir}/volumes_all.zip")
    n_classes = int(os.environ.get("STUB_CLASSES", "2"))
    for k in range(1, n_classes + 1):
        for name in ("particles.star", "particles.cs", "map.mrc", "map_half_A.mrc", "map_half_B.mrc",
                     "map_hard.mrc", "mask.mrc", "fsc.csv", "resolution.json", "angdist.bild"):
            _write(f"{out_dir}/class_{k:03d}/{name}")


def make_plots(models, refs, assign, out_dir, class_orientations, settings):
    assert len(models) == len(refs)
    _inputs(*models, *refs, *assign)
    names = ["class_sizes", "changed_fraction", "resolution", "posterior_hist", "fit_score_hist"]
    names += ["slices", "fsc_all"]
    for k in range(1, len(class_orientations) + 1):
        names += [f"fsc_class_{k:03d}", f"orientations_class_{k:03d}"]
    for name in names:
        _write(f"{out_dir}/{name}.png")
        _write(f"{out_dir}/{name}.svg")
    _write(f"{out_dir}/summary.html")
    for path in class_orientations:
        _write(path)
'''


def stub_kernel(tmp_path_factory) -> tuple[Path, dict]:
    """A copy of the package whose step modules are :data:`STUB_STEPS`; (src, environment)."""
    src = tmp_path_factory.mktemp("stub") / "src"
    shutil.copytree(
        ROOT / "src" / "hetrefine", src / "hetrefine", ignore=shutil.ignore_patterns("__pycache__")
    )
    for module in (src / "hetrefine" / "steps").glob("*.py"):
        if module.name != "__init__.py":
            module.write_text(STUB_STEPS)
    return src, {**os.environ, "PYTHONPATH": str(src)}


def test_wiring_with_stub_steps(wd, tmp_path_factory):
    """The whole DAG with a stand-in kernel: scripts pass what the steps expect, every
    declared output is written, a rerun has nothing to do, and a kernel edit reruns it."""
    src, env = stub_kernel(tmp_path_factory)
    args = overrides(wd, iterations=3, shard_size=400, demo={"n_particles": 1000})

    def run(*extra):
        return subprocess.run(
            [sys.executable, "-m", "snakemake", "--cores", "2", *args, *extra],
            cwd=wd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=300,
        )

    first = run()
    assert first.returncode == 0, first.stdout[-5000:]
    run_dir = wd / "results" / "demo"
    assert (run_dir / "plots" / "orientations_class_002.svg").is_file()
    assert not list(run_dir.rglob("*.sums.npz")), "temporary sums were kept"
    assert "stub align iteration 3" in (wd / "logs/demo/align/iter_003_shard_0002.log").read_text()
    assert (wd / "benchmarks/demo/align/iter_001_shard_0000.tsv").is_file()

    again = run("-n")
    assert "Nothing to be done" in again.stdout, again.stdout[-3000:]

    report = run("--report", "report.html")
    assert report.returncode == 0, report.stdout[-3000:]
    html = (wd / "report.html").read_text()
    for text in (
        "Convergence",
        "FSC",
        "Orientations",
        "Summary",
        "fsc_class_002.png",
        "viewing directions",
    ):
        assert text in html, text

    with open(src / "hetrefine" / "__init__.py", "a") as fh:
        fh.write("# a kernel edit\n")
    edited = run("-n")
    assert edited.returncode == 0, edited.stdout[-3000:]
    stats = job_stats(edited.stdout)
    assert stats["align"] == 3 * 3 and stats["simulate_demo"] == 1, stats


@pytest.mark.slow
def test_end_to_end_then_nothing_to_do(wd):
    args = overrides(
        wd,
        iterations=2,
        online_em_iterations=1,
        batch_size_per_class=50,
        shard_size=100,
        coarse_angle_step_deg=30,
        local_refine_levels=1,
        demo={"n_particles": 200, "box": 32, "pixel_size": 5.0},
        device="cpu",
    )
    start = time.perf_counter()
    result = smk(wd, "--cores", "2", *args, timeout=600)
    print(
        f"\nend-to-end demo (200 particles, box 32, 2 iterations): {time.perf_counter() - start:.1f} s"
    )
    assert result.returncode == 0, result.stdout[-5000:]
    run = wd / "results" / "demo"
    for name in ("particles_all.star", "volumes_all.zip", "mask.mrc", "iter_002/references.npz"):
        assert (run / name).is_file(), name
    for k in (1, 2):
        for name in ("particles.star", "map.mrc", "map_half_A.mrc", "map_hard.mrc", "fsc.csv"):
            assert (run / f"class_{k:03d}" / name).stat().st_size > 0
        assert (run / "plots" / f"fsc_class_{k:03d}.png").is_file()
    plot_names = ("class_sizes", "changed_fraction", "resolution", "posterior_hist", "slices")
    for name in (*plot_names, "fit_score_hist"):
        assert (run / "plots" / f"{name}.png").is_file()
        assert (run / "plots" / f"{name}.svg").is_file()
    assert not list(run.rglob("*.sums.npz")), "temporary sums were not removed"
    assert (wd / "logs" / "demo" / "align" / "iter_001_shard_0000.log").is_file()
    assert (wd / "benchmarks" / "demo" / "align" / "iter_002_shard_0001.tsv").is_file()

    again = smk(wd, "-n", *args)
    assert again.returncode == 0, again.stdout
    assert "Nothing to be done" in again.stdout, again.stdout


#: A changed, valid value for every key of the schema (a new key must be added here).
CHANGED = {
    "run": "other",
    "particles": None,  # an input file, not a setting: a new file reruns what reads it
    "initial_models": None,
    "project_dir": "/tmp",
    "pixel_size": 3.0,
    "demo": {"seed": 5},
    "refine_box": 40,
    "particle_diameter_A": 150,
    "mask": {"outer_diameter_A": 170},
    "symmetry": "C2",
    "iterations": 3,
    "stop_when_converged": False,
    "convergence_changed_fraction": 0.05,
    "online_em_iterations": 1,
    "batch_size_per_class": 500,  # x 2 classes >= the 800 particles: 2 online iterations are fine
    "online_em_decay": 0.5,
    "initial_lowpass_A": 25,
    "max_resolution_A": 12,
    "class_similarity": 0.5,
    "class_similarity_anneal_iterations": 2,
    "classification": "hard",
    "random_assignment_iterations": 1,
    "same_map_fsc": 1.0,
    "self_evidence_correction": True,
    "class_evidence": "coarse",
    "class_evidence_full_share": 0.7,
    "input_poses": None,  # refused at start: the demo has no poses (test_input_poses_and_gpu_...)
    "coarse_angle_step_deg": 20,
    "local_refine_levels": 1,
    "shift_range_px": 2,
    "shift_step_px": 2,
    "per_particle_scale": True,
    "junk_fit_score": -1.0,
    "tau2_fudge": 2.0,
    "shard_size": 500,  # still 2 shards of the 800 particles: only the params change
    "seed": 1,
    "device": "cpu",
    "workers": 3,  # a machine key: with an explicit shard_size it changes nothing
}

#: The workflow rule of each step where the names differ.
RULE_OF_STEP = {"demo": "simulate_demo", "mask": "make_mask"}


def test_changing_a_key_reruns_exactly_the_steps_that_read_it(wd, tmp_path_factory):
    """Walk the schema's keys: after a finished run, changing one key reruns the first
    rule whose step reads it (hetrefine.steps.SETTINGS, in DAG order) for its params, and
    no rule reruns for a key it does not read. (That a step reads no key outside its
    settings is enforced where it reads them: ``hetrefine.steps.Settings``.)"""
    from hetrefine.config import load_schema
    from hetrefine.steps import SETTINGS, step_keys

    load_config_keys = dict.fromkeys(CHANGED)

    assert set(CHANGED) == set(load_schema()["properties"]), "CHANGED must cover every key"
    _, env = stub_kernel(tmp_path_factory)
    base = {"iterations": 2, "shard_size": 400, "demo": {"n_particles": 800}}

    def run(*extra, **config):
        args = overrides(wd, **{**base, **config})
        return subprocess.run(
            [sys.executable, "-m", "snakemake", "--cores", "2", *args, *extra],
            cwd=wd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
        )  # fmt: skip

    first = run()
    assert first.returncode == 0, first.stdout[-3000:]
    for key, value in CHANGED.items():
        if value is None:
            continue
        if isinstance(value, dict):
            value = {**base.get(key, {}), **value}
        result = run("-n", **{key: value})
        assert result.returncode == 0, (key, result.stdout[-3000:])
        changed, scheduled, rule = set(), set(), None
        for line in result.stdout.splitlines():  # jobs, also those indented in group jobs
            m = re.match(r"\s*(?:local)?rule (\w+):", line)
            if m:
                rule = m.group(1)
                scheduled.add(rule)
            elif rule and re.match(r"\s*reason: .*Params have changed", line):
                changed.add(rule)
        expected = [
            RULE_OF_STEP.get(step, step)
            for step in SETTINGS
            if key in step_keys(step, load_config_keys)
        ]
        # the first rule (in DAG order) that reads the key reruns for its params; the later
        # ones rerun anyway (their inputs change), which is how Snakemake reports them
        # no rule reruns for a key it does not read; the first that reads it reruns (for its
        # params, or, when the key also changes the DAG as `iterations` does, for new inputs)
        assert changed <= set(expected), (key, changed, expected, result.stdout[-2000:])
        assert set(expected[:1]) <= (changed if key != "iterations" else scheduled), (
            key,
            changed,
            expected,
        )


def test_a_bad_initial_model_is_named_before_any_job(wd):
    """A constant map and a file that is not an MRC are named when the workflow starts,
    not after preprocessing has read every particle (issue 13, item 11)."""
    import mrcfile
    import numpy as np

    with mrcfile.new(wd / "flat.mrc") as m:
        m.set_data(np.full((16, 16, 16), 3.0, np.float32))
        m.voxel_size = 4.0
    (wd / "notes.mrc").write_text("these are my notes, not a map\n" * 40)
    for models, what in (
        ("[flat.mrc,notes.mrc]", "constant"),
        ("[notes.mrc,flat.mrc]", "not an MRC"),
    ):
        result = smk(wd, "--cores", "1", "--config", f"initial_models={models}")
        assert result.returncode != 0
        assert what in result.stdout and models[1:].split(",")[0] in result.stdout, result.stdout[
            -2000:
        ]
        assert "Job stats" not in result.stdout and not (wd / "results" / "demo_data").exists()


def test_a_focused_mask_is_checked_at_start_and_is_an_input_of_what_uses_it(wd):
    """mask.file: a file that is not a mask (values outside [0, 1]) is named when the
    workflow starts, before any job; a good one is an input of make_mask, whose focused
    mask is an input of every align job, so a changed mask file reruns them (issue 15,
    item 3)."""
    import mrcfile
    import numpy as np

    with mrcfile.new(wd / "map_not_mask.mrc") as m:
        m.set_data(np.linspace(-1, 3, 16**3, dtype=np.float32).reshape((16,) * 3))
        m.voxel_size = 4.0
    result = smk(wd, "--cores", "1", *overrides(wd, mask={"file": "map_not_mask.mrc"}))
    assert result.returncode != 0
    assert "map_not_mask.mrc (key 'mask.file'): values run from -1 to 3" in result.stdout, (
        result.stdout[-2000:]
    )
    assert "Job stats" not in result.stdout and not (wd / "results" / "demo_data").exists()
    with mrcfile.new(wd / "domain.mrc") as m:
        m.set_data(np.pad(np.ones((4, 4, 4), np.float32), 6))
        m.voxel_size = 4.0
    dry = smk(wd, "-n", "--cores", "1", *overrides(wd, iterations=2, mask={"file": "domain.mrc"}))
    assert dry.returncode == 0, dry.stdout[-3000:]
    (mask_job,) = jobs(dry.stdout, "make_mask")
    assert "domain.mrc" in mask_job["input"] and "mask_focus.mrc" in mask_job["output"]
    aligns = jobs(dry.stdout, "align")
    assert aligns and all("mask_focus.mrc" in job["input"] for job in aligns)


def test_input_poses_and_gpu_without_them_are_named_before_any_job(wd):
    """`input_poses: fixed` with a particle file without poses is refused when the workflow
    starts, and `device: gpu` without a GPU before any job (onstart), with the align job's
    own messages; a dry run with `device: gpu` still plans (issue 13, item 10)."""
    from hetrefine.simulate import SimulationSpec, simulate_dataset

    simulate_dataset(SimulationSpec(n_particles=40, box=24, pixel_size=4.0, seed=0), wd / "data")
    base = [
        "--cores", "1", "--config", "particles=data/particles.star",
        "initial_models=[data/initial_model_01.mrc,data/initial_model_02.mrc]",
    ]  # fmt: skip
    result = smk(wd, *base, "input_poses=fixed")
    assert result.returncode != 0
    assert "config (input_poses): input_poses: fixed needs poses" in result.stdout, result.stdout[
        -2000:
    ]
    assert "Job stats" not in result.stdout and not (wd / "results").exists()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # CuPy, if installed, sees no GPU
    gpu = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(wd / "Snakefile"), *base, "device=gpu"],
        cwd=wd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
    )  # fmt: skip
    assert gpu.returncode != 0
    assert "device: gpu was asked for but CuPy is not installed or sees no GPU" in gpu.stdout
    assert not (wd / "results").exists(), gpu.stdout[-2000:]
    dry = smk(wd, "-n", *base, "device=gpu")
    assert dry.returncode == 0, dry.stdout[-2000:]
