"""RELION STAR files: reading any block layout (teamtomo's ``starfile``), writing RELION 3.1.

``read_star_blocks`` wraps ``starfile.read`` and turns its (and pandas') parser
errors into :class:`hetrefine.errors.InputError` naming the file and line.
``write_particles_star`` writes the RELION 3.1 layout (``data_optics`` +
``data_particles``) that RELION 3.1+, CryoSPARC's import and pyem all read.
"""

from __future__ import annotations

import linecache
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from hetrefine.errors import InputError
from hetrefine.io.atomic import atomic_path

#: Columns that RELION 3.1 keeps per optics group (in ``data_optics``), in write order.
OPTICS_COLUMNS: tuple[str, ...] = (
    "rlnOpticsGroup",
    "rlnOpticsGroupName",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
    "rlnImagePixelSize",
    "rlnImageSize",
    "rlnImageDimensionality",
)

#: Further optics-level columns moved to ``data_optics`` when present (RELION 3.1+ names).
EXTRA_OPTICS_COLUMNS: tuple[str, ...] = (
    "rlnMicrographOriginalPixelSize",
    "rlnMicrographPixelSize",
    "rlnCtfDataAreCtfPremultiplied",
    "rlnCtfDataArePhaseFlipped",
    "rlnBeamTiltX",
    "rlnBeamTiltY",
    "rlnOddZernike",
    "rlnEvenZernike",
    "rlnMagMat00",
    "rlnMagMat01",
    "rlnMagMat10",
    "rlnMagMat11",
    "rlnMtfFileName",
)

_LINE_RE = re.compile(r"line (\d+)")
#: Column names written to STAR files; others (e.g. CryoSPARC's ``ctf/df1_A``) are left out.
_LABEL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def read_star_blocks(path: str | os.PathLike) -> dict[str, pd.DataFrame]:
    """Every data block of a STAR file, by block name (``""`` for a bare ``data_``).

    Loop blocks become DataFrames with the ``_rln`` prefix dropped from column
    names by ``starfile`` (``rlnImageName``); key/value blocks become one-row
    DataFrames. Raises :class:`InputError` for a missing or unreadable file, a
    file without data blocks, rows with more fields than the loop has columns,
    and duplicate column names.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "STAR file does not exist (or is not a file)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                raw = starfile.read(path, always_dict=True)
            finally:
                # starfile reads lines through linecache and clears it only after a
                # successful parse: without this, a file fixed after a failed read
                # would be parsed from its stale cached lines.
                linecache.clearcache()
    except pd.errors.ParserError as exc:
        line = _LINE_RE.search(str(exc))
        where = f"loop line {line.group(1)}" if line else None
        raise InputError(
            path,
            f"a row has a different number of fields than the loop has columns ({exc})".strip(),
            where,
        ) from exc
    except UnicodeDecodeError as exc:
        raise InputError(path, "not a text STAR file (cannot decode as text)") from exc
    except Exception as exc:  # starfile raises assorted errors on malformed input
        raise InputError(
            path, f"cannot parse as a STAR file ({type(exc).__name__}: {exc})"
        ) from exc
    if not raw:
        check_star_text(path)
        raise InputError(path, "no data blocks found (empty file or not a STAR file)")
    blocks: dict[str, pd.DataFrame] = {}
    for name, block in raw.items():
        if isinstance(block, pd.DataFrame):
            df = block
        elif isinstance(block, dict):
            df = pd.DataFrame([block])
        else:  # pragma: no cover - starfile only returns the two kinds
            raise InputError(path, f"unexpected block type {type(block).__name__}", f"data_{name}")
        dup = df.columns[df.columns.duplicated()].unique().tolist()
        if dup:
            raise InputError(
                path,
                f"duplicate column(s) {', '.join('_' + str(c) for c in dup)}; each label may appear once",
                f"data_{name}",
            )
        blocks[str(name)] = df
    return blocks


def check_star_text(path: str | os.PathLike) -> None:
    """Refuse, saying what it is, a file given as a STAR file that is no UTF-8 text: a
    numpy (.cs) or MRC file, UTF-16 text, a Latin-1 byte (e.g. an ``é`` in a comment from a
    Windows editor; the line and byte are named) or a binary file. ``starfile`` reads such
    files as empty, so this runs when no block or particle loop was found."""
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(1024)
        if head.startswith(b"\x93NUMPY"):
            raise InputError(
                path, "is a numpy file (a CryoSPARC .cs file?), not a STAR file: name it .cs"
            )
        if head[208:212] == b"MAP " or path.suffix.lower() in (".mrc", ".mrcs", ".map"):
            raise InputError(
                path,
                "is an MRC file (images or a map), not a particle STAR file: give the STAR "
                "or .cs file that lists the particles (it names the stack)",
            )
        if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
            raise InputError(
                path,
                "is UTF-16 text (as Windows Notepad saves 'Unicode'); STAR files are read as "
                "UTF-8: save it as UTF-8, or convert it (iconv -f utf-16 -t utf-8)",
            )
        fh.seek(0)
        for lineno, line in enumerate(fh, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                byte = line[exc.start]
                if b"\0" in line:
                    what = "is a binary file, not a text STAR file"
                else:
                    what = (
                        f"byte 0x{byte:02x} at column {exc.start + 1} is not UTF-8 text (a "
                        "Latin-1 or Windows character?); STAR files are read as UTF-8: replace "
                        "the character, or convert the file (iconv -f latin1 -t utf-8)"
                    )
                raise InputError(path, what, f"line {lineno}") from None


def _check_group_constant(particles: pd.DataFrame, cols: list[str], path: Path) -> None:
    """Every optics column must be constant within an optics group (else it is per particle)."""
    for col in cols:
        nun = particles.groupby("rlnOpticsGroup", sort=True)[col].nunique(dropna=False)
        bad = nun[nun > 1]
        if len(bad):
            raise InputError(
                path,
                f"column {col} differs between particles of optics group {int(bad.index[0])}; "
                "it must be constant within an optics group to be written to data_optics",
            )


def split_optics(
    particles: pd.DataFrame, path: str | os.PathLike = "<table>"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split a canonical table (optics merged in every row) into (optics, particles) tables.

    Internal ``hr_*`` columns and columns whose names are not STAR labels
    (letters, digits, ``_``; e.g. CryoSPARC's ``ctf/df1_A``) are dropped. Missing ``rlnOpticsGroup`` means one
    group (1); missing ``rlnOpticsGroupName`` becomes ``opticsGroup<N>``;
    missing ``rlnImageDimensionality`` becomes 2. Optics groups are renumbered
    1..N in increasing order, as RELION requires.
    """
    path = Path(path)
    drop = [c for c in particles.columns if str(c).startswith("hr_") or not _LABEL_RE.match(str(c))]
    df = particles.drop(columns=drop)
    df = df.copy()
    if "rlnOpticsGroup" not in df.columns:
        df["rlnOpticsGroup"] = 1
    df["rlnOpticsGroup"] = df["rlnOpticsGroup"].astype(np.int64)
    if "rlnOpticsGroupName" not in df.columns:
        df["rlnOpticsGroupName"] = [f"opticsGroup{g}" for g in df["rlnOpticsGroup"]]
    # RELION wants groups numbered 1..N in data_optics order; renumber by rank
    # (names keep the original numbers, e.g. CryoSPARC's exposure group 24).
    groups = np.unique(df["rlnOpticsGroup"].to_numpy())
    df["rlnOpticsGroup"] = np.searchsorted(groups, df["rlnOpticsGroup"].to_numpy()) + 1
    if "rlnImageDimensionality" not in df.columns:
        df["rlnImageDimensionality"] = 2
    missing = [c for c in OPTICS_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(path, f"cannot write RELION 3.1 optics: missing column(s) {missing}")
    optics_cols = list(OPTICS_COLUMNS) + [c for c in EXTRA_OPTICS_COLUMNS if c in df.columns]
    # Only move columns that really are per group; leave varying extras per particle.
    moved = list(OPTICS_COLUMNS)
    for col in optics_cols[len(OPTICS_COLUMNS) :]:
        nun = df.groupby("rlnOpticsGroup")[col].nunique(dropna=False)
        if (nun <= 1).all():
            moved.append(col)
    _check_group_constant(df, moved[1:], path)
    optics = (
        df[moved].drop_duplicates(subset="rlnOpticsGroup").sort_values("rlnOpticsGroup")
    ).reset_index(drop=True)
    for col in ("rlnImageSize", "rlnImageDimensionality"):
        optics[col] = optics[col].astype(np.int64)
    parts = df.drop(columns=moved[1:]).reset_index(drop=True)
    # rlnOpticsGroup stays in the particles block; put it right after rlnImageName.
    return optics, parts


def star_string_problem(value: str) -> str | None:
    """Why RELION 3.1 could not read ``value`` back from a STAR file, or None when it can.

    RELION writes a string holding whitespace in double quotes (``"a b"``) and reads
    it back as one token; we write such strings the same way. Its reader turns tabs
    into spaces and collapses runs of spaces (inside quotes too), and has no escape
    for a double quote, so those strings would come back different.
    """
    if any(c in value for c in "\t\n\r"):
        return "a tab or line break in a STAR value is read back by RELION as a space"
    if '"' in value:
        return "a double quote in a STAR value cannot be read back by RELION"
    if "  " in value:
        return "RELION reads two consecutive spaces in a STAR value back as one"
    return None


_UNWRITABLE_RE = r'[\t\n\r"]|  '


def unwritable_string(df: pd.DataFrame) -> tuple[str, int, str, str] | None:
    """The first string value of ``df`` that RELION could not read back (column, 0-based
    row, value, why; see :func:`star_string_problem`), or None. Vectorised per column."""
    for col in df.columns:
        s = df[col]
        if s.dtype == object or pd.api.types.is_string_dtype(s):
            try:
                hit = s.str.contains(_UNWRITABLE_RE, regex=True, na=False)
            except AttributeError:  # an object column without strings
                continue
            hit = hit.to_numpy(dtype=bool)
            if hit.any():
                row = int(np.flatnonzero(hit)[0])
                value = str(s.iloc[row])
                return str(col), row, value, str(star_string_problem(value))
    return None


def write_particles_star(
    path: str | os.PathLike, particles: pd.DataFrame, image_names: str = "absolute"
) -> None:
    """Write a particle table as a RELION 3.1 STAR file (``data_optics`` + ``data_particles``).

    ``particles`` is a canonical table (see :func:`hetrefine.io.particles.read_particles`):
    one row per particle with optics columns merged in. The optics columns
    (:data:`OPTICS_COLUMNS`, plus known per-group extras) go to ``data_optics``
    one row per group; every other column, except internal ``hr_*`` columns,
    goes to ``data_particles`` in the table's order. Floats are written with
    6 decimals. The write is atomic and byte-stable (no time stamp).

    image_names: ``"absolute"`` (default) rewrites ``rlnImageName`` as
    ``{hr_index+1:06d}@{hr_stack}`` when the table has those columns, so the
    file opens from any folder; ``"keep"`` writes ``rlnImageName`` as it is.
    """
    path = Path(path)
    if len(particles) == 0:
        raise InputError(path, "refusing to write a STAR file with no particles")
    if image_names not in ("absolute", "keep"):
        raise ValueError(f"image_names must be 'absolute' or 'keep', got {image_names!r}")
    if image_names == "absolute" and {"hr_stack", "hr_index"} <= set(particles.columns):
        particles = particles.assign(
            rlnImageName=[
                f"{int(i) + 1:06d}@{s}"
                for i, s in zip(particles["hr_index"], particles["hr_stack"], strict=True)
            ]
        )
    optics, parts = split_optics(particles, path)
    for block, df in (("data_optics", optics), ("data_particles", parts)):
        if bad := unwritable_string(df):
            col, row, value, why = bad
            raise InputError(
                path, f"cannot write _{col} = {value!r}: {why}", f"{block} row {row + 1}"
            )
    with atomic_path(path, suffix=".star") as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # starfile quotes strings holding a space ("a b", as RELION 3.1 writes and
            # reads them); with a space separator pandas' writer would refuse them, so
            # write tab-separated and turn the (value-free) tabs into spaces below.
            starfile.write(
                {"optics": optics, "particles": parts}, tmp, float_format="%.6f", sep="\t"
            )
        # Drop starfile's time-stamped banner so the output is byte-stable.
        lines = [
            ln.replace("\t", " ")
            for ln in tmp.read_text().splitlines()
            if not ln.startswith("# Created by")
        ]
        tmp.write_text("\n# version 30001 (written by hetrefine)\n" + "\n".join(lines) + "\n")
