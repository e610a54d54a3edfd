"""Step of rule `reduce_sums`: add a few sums files (shards' sums or the tree level below)
into one, so no job reads more than ``hetrefine.plan.SUMS_FAN_IN`` sums files."""

from __future__ import annotations

from collections.abc import Mapping

from hetrefine.io import run_files


def reduce_sums(sums: list[str], out_sums: str, settings: Mapping) -> None:
    """The sum of the files ``sums`` (added in double precision, in sorted order),
    written in single precision (``run_files.write_sums``)."""
    total = run_files.SumsTotal()
    for path in sorted(sums):
        total.add_file(path)
    total.write(out_sums)
