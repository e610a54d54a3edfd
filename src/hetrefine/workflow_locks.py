"""Locks that a killed Snakemake run leaves behind, and their removal.

A run killed with SIGKILL (a node failure, an out-of-time job, Ctrl-C twice)
leaves ``.snakemake/locks/*.lock``, and Snakemake then refuses to start
("Directory cannot be locked") until ``snakemake --unlock``. The workflow calls
:func:`remove_stale_lock` from its main process (never from a cluster job): when
no other Snakemake process runs in the same folder on this machine, the lock is
stale and goes. A run of the same folder from another machine of a shared file
system cannot be seen from here: there, ``snakemake --unlock`` stays the user's
call (README, "After a kill"). This is the package's one piece of Snakemake
plumbing; it only reads ``/proc`` and removes lock files.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PROC = Path("/proc")


def _ancestors(pid: int) -> set[int]:
    """``pid`` and its parents (a wrapper shell or the ``snakemake`` launcher)."""
    out = set()
    while pid > 1 and pid not in out:
        out.add(pid)
        try:
            stat = (PROC / str(pid) / "stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def snakemake_pid_in(folder: str | os.PathLike) -> int | None:
    """The process id of another Snakemake process (not this one or its parents) with
    ``folder`` as its working directory, on this machine; None when there is none."""
    mine, here = _ancestors(os.getpid()), os.path.realpath(folder)
    for proc in PROC.glob("[0-9]*"):
        try:
            if int(proc.name) in mine or b"snakemake" not in (proc / "cmdline").read_bytes():
                continue
            if os.path.realpath(proc / "cwd") == here:
                return int(proc.name)
        except (OSError, ValueError):
            continue
    return None


def snakemake_running_in(folder: str | os.PathLike) -> bool:
    """Another Snakemake process (not this one or its parents) runs in ``folder``."""
    return snakemake_pid_in(folder) is not None


def remove_stale_lock(folder: str | os.PathLike) -> int:
    """Remove ``folder/.snakemake/locks/*.lock`` when no other Snakemake runs in ``folder``;
    says so on stderr. Returns the number of lock files removed (0 without /proc)."""
    locks = sorted((Path(folder) / ".snakemake" / "locks").glob("*.lock"))
    if not locks or not PROC.is_dir():
        return 0
    if (pid := snakemake_pid_in(folder)) is not None:
        print(
            f"hetrefine: another run (Snakemake, process {pid}) is running in this folder and "
            "holds its lock, so this one stops (LockException below): wait for it to finish, "
            "or stop it first. Do not use --unlock while it runs: both would write the same "
            "files",
            file=sys.stderr,
        )
        return 0
    for lock in locks:
        lock.unlink(missing_ok=True)
    print(
        f"hetrefine: removed a lock left by a killed run ({len(locks)} file(s) in .snakemake/locks)",
        file=sys.stderr,
    )
    return len(locks)
