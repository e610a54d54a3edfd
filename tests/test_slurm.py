"""The SLURM profiles, and what only a real cluster executor evaluates.

A dry run sets ``--cores 1`` behind the scenes, so it never meets what a
cluster executor does: no total of cores (Snakemake 9 then refuses
``workflow.cores``), threads capped by the profile, group jobs. These tests
build the workflow as a cluster executor does, and run the demo on a real
SLURM when one answers (``.ci/slurm.sh`` starts one; skipped otherwise).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_workflow import copy_workflow, smk  # a copy of the workflow; snakemake on it

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ROOT / "workflow" / "profiles"
SMALL_DEMO = {
    "iterations": 2,
    "online_em_iterations": 1,
    "batch_size_per_class": 50,
    "shard_size": 100,
    "coarse_angle_step_deg": 30,
    "local_refine_levels": 1,
    "demo": {"n_particles": 200, "box": 32, "pixel_size": 5.0},
    "device": "cpu",
}


def profile(name: str) -> dict:
    return yaml.safe_load((PROFILES / name / "config.yaml").read_text())


# ------------------------------------------------------------------ profiles


def test_plain_slurm_profile_asks_no_gpu():
    """A CPU-only partition rejects `--gpus`/`--gres`: the plain profile must ask none."""
    text = yaml.safe_dump(profile("slurm"))
    assert "gpu" not in text.replace("slurm-gpu", "")
    assert "gres" not in text


def test_gpu_profile_is_the_plain_one_plus_a_gpu_for_align():
    plain, gpu = profile("slurm"), profile("slurm-gpu")
    set_resources = gpu.pop("set-resources")
    assert set_resources == {"align": {"gres": "gpu:1"}}
    assert gpu == plain


@pytest.mark.parametrize("name", ["slurm", "slurm-gpu"])
def test_profile_status_needs_no_accounting(name):
    """sacct fails without an accounting database and the run then hangs; squeue does not."""
    p = profile(name)
    assert p["executor"] == "slurm"
    assert p["slurm-status-command"] == "squeue"
    # The plugin keeps squeue only while MinJobAge (default 300 s) >= 3 x this.
    assert 3 * p["slurm-init-seconds-before-status-checks"] <= 300


def test_profile_caps_threads_for_jobs_and_groups():
    """`cores` caps every job's threads and every group job's sum (else it pends forever)."""
    p = profile("slurm")
    assert isinstance(p["cores"], int) and p["cores"] >= 1


@pytest.mark.parametrize("name", ["slurm", "slurm-gpu"])
def test_profile_dry_run_threads_within_cores(tmp_path, name):
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        pytest.skip("snakemake-executor-plugin-slurm is not installed")
    wd = copy_workflow(tmp_path)
    result = smk(wd, "-n", "--profile", f"workflow/profiles/{name}")
    assert result.returncode == 0, result.stdout[-3000:]
    cap = profile(name)["cores"]
    threads = [int(t) for t in re.findall(r"^\s+threads: (\d+)$", result.stdout, re.M)]
    assert threads and max(threads) <= cap
    gres = re.findall(r"^\s+resources: .*gres=([^,\s]+)", result.stdout, re.M)
    assert gres == (["gpu:1"] * 16 if name == "slurm-gpu" else [])
    assert "Group job iteration_001" in result.stdout  # 2 shards <= cores: one job per iteration


# ------------------------------------- what a cluster executor evaluates


def test_thread_functions_work_without_cores():
    """Under a cluster executor `--cores` is unset and `workflow.cores` raises; every
    rule's thread function must still give a count (this crashed every SLURM run)."""
    from snakemake.api import SnakemakeApi
    from snakemake.iocontainers import Wildcards
    from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings

    with SnakemakeApi(OutputSettings()) as api:
        workflow_api = api.workflow(
            resource_settings=ResourceSettings(nodes=10),  # --jobs 10, no --cores
            config_settings=ConfigSettings(),
            snakefile=ROOT / "Snakefile",
            workdir=ROOT,
        )
        workflow_api.dag()
        workflow = workflow_api._workflow
        assert workflow.resource_settings.cores is None
        wildcards = Wildcards(
            fromdict={"it": "001", "s": "0000", "stage": "iter_001", "level": "1", "node": "0000"}
        )
        counted = 0
        for rule in workflow.rules:
            threads = rule.resources["_cores"]
            if threads.is_evaluable():
                n = threads.evaluate(wildcards).value
                assert isinstance(n, int) and 1 <= n <= 4, (rule.name, n)
                counted += 1
            # The rules' `group:` helpers are evaluated the same way (none needs --cores).
            if callable(rule._group):
                assert rule._group(wildcards) is None  # no node size known: no grouping
        assert counted >= 2  # align and hard_sums


# ------------------------------------------------------------- a real SLURM


def slurm_up() -> str | None:
    """None when a SLURM controller answers with an idle node, else why not."""
    if shutil.which("sinfo") is None:
        return "no SLURM on this machine (sinfo not found; .ci/slurm.sh installs and starts one)"
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20
        )
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 20 s"
    if out.returncode != 0 or not re.search(r"idle|mixed", out.stdout):
        said = (out.stderr.strip().splitlines() or ["no idle node"])[-1]
        return f"no SLURM controller with an idle node answers ({said})"
    return None


def cluster_gpus() -> int:
    """GPUs (gres/gpu) the cluster's nodes declare, summed."""
    out = subprocess.run(["sinfo", "-h", "-o", "%D %G"], capture_output=True, text=True, timeout=20)
    total = 0
    for line in out.stdout.splitlines():
        nodes, gres = line.split(maxsplit=1)
        m = re.search(r"gpu(?::[^:,()]+)?:(\d+)", gres)
        total += int(nodes) * int(m.group(1)) if m else 0
    return total


@pytest.mark.slow
@pytest.mark.parametrize("name", ["slurm", "slurm-gpu"])
def test_demo_through_the_shipped_profile_on_real_slurm(tmp_path, name):
    """The shipped profile, unchanged, through sbatch: completes and gives the local run's bytes.

    `slurm` runs on any cluster; `slurm-gpu` where the nodes declare a GPU
    (.ci/slurm.sh with HETREFINE_CI_GPUS=1 declares one without a device).
    """
    why = slurm_up()
    if why:
        pytest.skip(why)
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        pytest.skip("snakemake-executor-plugin-slurm is not installed")
    gpus = cluster_gpus()
    if name == "slurm-gpu" and not gpus:
        pytest.skip("the cluster's nodes declare no GPU (gres/gpu)")
    if name == "slurm" and not gpus:
        # What the plain profile exists for: a CPU-only cluster refuses GPU requests.
        refused = subprocess.run(
            ["sbatch", "--gres=gpu:1", "--wrap=true"], capture_output=True, text=True, timeout=60
        )
        assert refused.returncode != 0 and "generic resource" in refused.stderr.lower()
    sys.path.insert(0, str(ROOT / ".ci"))
    from compare_runs import differences

    runs = {}
    for where, args in (
        ("local", ["--cores", "2"]),
        ("cluster", ["--profile", f"workflow/profiles/{name}"]),
    ):
        wd = copy_workflow(tmp_path / where)
        (wd / "small.yaml").write_text(yaml.safe_dump(SMALL_DEMO))
        start = time.perf_counter()
        result = smk(wd, *args, "--configfile", "small.yaml", "--config", "run=small", timeout=900)
        print(f"{where}: {time.perf_counter() - start:.0f} s")
        assert result.returncode == 0, result.stdout[-5000:]
        runs[where] = (wd, result.stdout)
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+)", runs["cluster"][1])
    assert len(submitted) >= 5, runs["cluster"][1][-3000:]
    assert "Group job iteration_001" in runs["cluster"][1]  # 2 shards <= cores 2: one job
    assert "Error" not in runs["cluster"][1]
    asked = subprocess.run(
        ["squeue", "-h", "--states=all", "-o", "%i %b"], capture_output=True, text=True, timeout=60
    ).stdout
    gres = {jobid: rest for jobid, _, rest in (line.partition(" ") for line in asked.splitlines())}
    with_gpu = [j for j in submitted if "gpu" in gres.get(j, "")]
    if name == "slurm-gpu":  # the group jobs (align inside) asked for the GPU, the others not
        assert 1 <= len(with_gpu) < len(submitted), gres
    else:
        assert not with_gpu, gres
    problems = differences(runs["local"][0] / "results/small", runs["cluster"][0] / "results/small")
    assert not problems, problems
