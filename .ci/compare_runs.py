"""Compare two runs' results folders file by file (a local run and a cluster run).

    python .ci/compare_runs.py RESULTS_A RESULTS_B

Every file under A must exist in B with the same bytes; in text files
(STAR, CSV, JSON, TXT, SVG) each run's own absolute folder is replaced by a
placeholder first, since the particle tables name their image stacks by
absolute path; the particle table (``preprocess/metadata.npz``, read with
``hetrefine.io.run_files.read_metadata``) is compared as a table, with the same
replacement in its text columns. Exit status 1 with one line per difference.
"""

from __future__ import annotations

import sys
from pathlib import Path

TEXT = {".star", ".csv", ".json", ".txt", ".svg"}


def workdir(root: Path) -> str:
    """results/<run> sits two levels under the folder the workflow ran in."""
    return str(root.parent.parent.resolve())


def normalised(path: Path, root: Path):
    if path.name == "metadata.npz":
        import pandas as pd

        from hetrefine.io.run_files import read_metadata

        table = read_metadata(path)
        for col in table.columns:
            if pd.api.types.is_string_dtype(table[col]) or table[col].dtype == object:
                table[col] = table[col].astype(str).str.replace(workdir(root), "<WORKDIR>")
        return table
    data = path.read_bytes()
    if path.suffix in TEXT:
        data = data.replace(workdir(root).encode(), b"<WORKDIR>")
    return data


def same(a, b) -> bool:
    if hasattr(a, "equals"):
        return type(a) is type(b) and a.equals(b)
    return a == b


def differences(a: Path, b: Path) -> list[str]:
    problems = []
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    if not files:
        return [f"{a}: no files"]
    for rel in files:
        other = b / rel
        if not other.is_file():
            problems.append(f"{rel}: missing in {b}")
        elif not same(normalised(a / rel, a), normalised(other, b)):
            problems.append(f"{rel}: differs")
    return problems


def main(argv: list[str]) -> int:
    a, b = Path(argv[1]), Path(argv[2])
    problems = differences(a, b)
    n = sum(1 for p in a.rglob("*") if p.is_file())
    for line in problems:
        print(line)
    print(f"{n - len(problems)} of {n} files identical ({a} vs {b})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
