"""A lock left by a killed run is removed, a lock of a live run is not."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from hetrefine.workflow_locks import remove_stale_lock, snakemake_running_in

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc (Linux)")


def locks(folder: Path) -> list[Path]:
    d = folder / ".snakemake" / "locks"
    d.mkdir(parents=True, exist_ok=True)
    for name in ("0.input.lock", "0.output.lock"):
        (d / name).write_text("results/x\n")
    return sorted(d.iterdir())


def test_stale_lock_removed(tmp_path, capsys):
    files = locks(tmp_path)
    assert remove_stale_lock(tmp_path) == 2
    assert not any(f.exists() for f in files)
    assert "removed a lock left by a killed run" in capsys.readouterr().err
    assert remove_stale_lock(tmp_path) == 0  # nothing left to do


def test_lock_of_a_live_run_kept(tmp_path):
    files = locks(tmp_path)
    # a process that looks like Snakemake, running in the folder
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)", "snakemake"], cwd=tmp_path
    )
    try:
        deadline = time.monotonic() + 10
        while not snakemake_running_in(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert snakemake_running_in(tmp_path)
        assert remove_stale_lock(tmp_path) == 0
        assert all(f.exists() for f in files)
    finally:
        proc.kill()
        proc.wait()
