"""Faults: a run killed with SIGKILL at any point finishes on rerun, with the same results.

The workflow is copied into ``tmp_path`` and run on a tiny demo (120 particles,
box 24, 2 iterations, 2 shards) with ``python -m snakemake`` in its own process
group. One run is killed (the whole group, as a node failure would) when a
chosen job starts writing: the demo simulation, preprocess, an align shard,
reconstruct, the final class outputs and the plots. After each kill no output
is half written (every MRC, npz, STAR, JSON and zip under ``results/`` reads
back); then the same command, with no ``--unlock`` or ``--rerun-incomplete``,
carries on to the next kill point (the default workflow profile reruns
incomplete jobs; the Snakefile removes the killed run's stale lock), and the
last rerun completes. Its outputs equal those of an
uninterrupted run with the same seed: every file byte for byte, except STAR
files (their image names are absolute: compared with each run's folder masked)
and the particle metadata (absolute paths).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from test_workflow import copy_workflow, job_stats  # the workflow copy; a dry run's "Job stats"

from hetrefine.io.star import read_star_blocks

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CONFIG = [
    "--config",
    "demo={n_particles: 120, box: 24}",
    "iterations=2",
    "shard_size=60",
]
RUN = "results/demo"
#: (name, folder whose first entry, hidden temporary files included, triggers the kill)
KILL_POINTS = [
    ("simulate", "results/demo_data"),
    ("preprocess", f"{RUN}/preprocess"),
    ("align shard", f"{RUN}/iter_001/align"),
    ("reconstruct", f"{RUN}/iter_002"),
    ("write_classes", f"{RUN}/class_001"),
    ("plots", f"{RUN}/plots"),
]
#: Files that hold the run folder's absolute path (the canonical table's hr_stack).
PATH_DEPENDENT = {f"{RUN}/preprocess/metadata.npz"}


def smk_cmd(wd: Path, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "snakemake", "--snakefile", str(wd / "Snakefile"),
        "--cores", "2", *CONFIG, *args,
    ]  # fmt: skip


def smk(wd: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        smk_cmd(wd, *args),
        cwd=wd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


def run_and_kill(wd: Path, folder: str, timeout: float = 120) -> tuple[bool, float]:
    """Start a (re)run; SIGKILL its whole process group as soon as ``folder`` has an entry.

    Returns (killed while running, seconds until the kill).
    """
    log = open(wd / "kill_run.log", "a")
    proc = subprocess.Popen(
        smk_cmd(wd),
        cwd=wd,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    target = wd / folder
    start = time.monotonic()
    try:
        while time.monotonic() - start < timeout:
            if proc.poll() is not None:
                return False, time.monotonic() - start
            if target.is_dir() and any(os.scandir(target)):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return True, time.monotonic() - start
            time.sleep(0.002)
        raise AssertionError(f"{folder} did not appear within {timeout} s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def result_files(wd: Path) -> list[str]:
    """Every output under results/ except hidden temporary files (relative paths)."""
    out = []
    for p in (wd / "results").rglob("*"):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(wd).parts):
            out.append(str(p.relative_to(wd)))
    return sorted(out)


def hidden_leftovers(wd: Path) -> list[str]:
    return sorted(str(p.relative_to(wd)) for p in (wd / "results").rglob(".*") if p.is_file())


def check_complete(wd: Path, name: str) -> None:
    """Every output file under its final name reads back completely."""
    p = wd / name
    if name.endswith((".mrc", ".mrcs")):
        with mrcfile.open(p, permissive=False) as m:
            assert m.data is not None and np.isfinite(m.data).all(), name
    elif name.endswith(".npz"):
        with np.load(p) as z:
            for key in z.files:
                z[key]
    elif name.endswith(".star"):
        assert read_star_blocks(p), name
    elif name.endswith(".json"):
        json.loads(p.read_text())
    elif name.endswith(".zip"):
        with zipfile.ZipFile(p) as z:
            assert z.testzip() is None, name
    elif name.endswith(".png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.read_bytes()[-8:-4] == b"IEND"
    elif name.endswith(".svg"):
        assert p.read_text().rstrip().endswith("</svg>"), name


def same_output(a: Path, b: Path, name: str) -> bool:
    """Byte-identical; MRC files: the same data, shape and voxel size; STAR files: the
    same text once each run's own folder is masked (their image names are absolute)."""
    if name.endswith((".mrc", ".mrcs")):
        with mrcfile.open(a / name) as ma, mrcfile.open(b / name) as mb:
            return (
                ma.data.dtype == mb.data.dtype
                and np.array_equal(ma.data, mb.data)
                and ma.voxel_size == mb.voxel_size
            )
    if name.endswith(".star"):  # image names are absolute: compare with the run folder masked
        return (a / name).read_text().replace(str(a), "<run>") == (b / name).read_text().replace(
            str(b), "<run>"
        )
    return (a / name).read_bytes() == (b / name).read_bytes()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted run of the tiny demo."""
    wd = copy_workflow(tmp_path_factory.mktemp("faults") / "reference")
    t0 = time.monotonic()
    result = smk(wd)
    assert result.returncode == 0, result.stdout[-3000:]
    print(f"\nuninterrupted run: {time.monotonic() - t0:.1f} s")
    return wd


def test_kill_at_six_points_then_rerun_gives_the_same_outputs(reference, tmp_path):
    wd = copy_workflow(tmp_path / "killed")
    report = []
    for point, folder in KILL_POINTS:
        killed, t = run_and_kill(wd, folder)
        assert killed, f"the run ended before reaching {point} ({folder}); see kill_run.log"
        for name in result_files(wd):
            check_complete(wd, name)
        report.append(f"{point}: killed after {t:.1f} s, {len(result_files(wd))} outputs intact")
    t0 = time.monotonic()
    final = smk(wd)  # the command the user ran, as it was
    assert final.returncode == 0, final.stdout[-3000:]
    assert "removed a lock left by a killed run" in final.stdout
    report.append(f"final rerun: {time.monotonic() - t0:.1f} s")
    leftovers = hidden_leftovers(wd)
    report.append(f"hidden temporary files left by the kills: {leftovers}")
    print("\n" + "\n".join(report))

    names = result_files(reference)
    assert result_files(wd) == names
    for name in names:
        check_complete(wd, name)
    differ = [n for n in names if n not in PATH_DEPENDENT and not same_output(reference, wd, n)]
    assert differ == []
    stamped = [n for n in names if (reference / n).read_bytes() != (wd / n).read_bytes()]
    print(f"not byte-identical (MRC header time stamps, absolute paths): {stamped}")
    assert any(n.endswith("particles_all.star") for n in names)
    assert sum(n.endswith(".mrc") for n in names) >= 10
    # and nothing is left to do
    dry = smk(wd, "-n")
    assert dry.returncode == 0 and "Nothing to be done" in dry.stdout, dry.stdout[-2000:]


def test_continue_a_finished_run_with_more_iterations(reference, tmp_path):
    """Raising `iterations` from 2 to 3 on a finished run does only iteration 3 and the
    final steps (RELION's --continue), and gives what a 3-iteration run from scratch
    gives: the schedule depends on the iteration number, never on the total."""
    more = [c if c != "iterations=2" else "iterations=3" for c in CONFIG]

    def cmd(wd, *args):
        return [
            sys.executable,
            "-m",
            "snakemake",
            "--snakefile",
            str(wd / "Snakefile"),
            "--cores",
            "2",
            *more,
            *args,
        ]

    def run(wd, *args):
        return subprocess.run(cmd(wd, *args), cwd=wd, capture_output=True, text=True, timeout=300)

    continued = tmp_path / "continued"
    shutil.copytree(reference, continued, symlinks=True)
    dry = run(continued, "-n")
    assert dry.returncode == 0, dry.stdout[-3000:]
    counts = job_stats(dry.stdout)
    counts.pop("total", None)
    assert counts == {
        "align": 2,
        "reconstruct": 1,
        "hard_sums": 2,
        "write_classes": 1,
        "plots": 1,
        "all": 1,
    }, counts
    outputs = [ln for ln in dry.stdout.splitlines() if ln.strip().startswith("output:")]
    assert any("iter_003" in ln for ln in outputs), dry.stdout[-3000:]
    # iteration 2 is not redone (its assignments are only read: the align rule's prev_assign)
    assert not any("iter_002" in ln for ln in outputs), dry.stdout[-3000:]
    done = run(continued)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    scratch = copy_workflow(tmp_path / "scratch")
    fresh = run(scratch)
    assert fresh.returncode == 0, fresh.stdout[-3000:] + fresh.stderr[-3000:]
    names = result_files(scratch)
    assert result_files(continued) == names

    # the continued run's particle table was made in the reference's folder (it was copied):
    # its STAR files name the reference's stacks, so that folder is masked as well
    def same(n):
        if n.endswith(".star"):
            text = (continued / n).read_text().replace(str(reference), "<run>")
            want = (scratch / n).read_text().replace(str(scratch), "<run>")
            return text.replace(str(continued), "<run>") == want
        return same_output(scratch, continued, n)

    differ = [n for n in names if n not in PATH_DEPENDENT and not same(n)]
    assert differ == []
