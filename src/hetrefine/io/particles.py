"""The canonical particle table: every particle file format read into one table.

``read_particles`` reads a RELION 3.0 STAR, a RELION 3.1+ STAR or a CryoSPARC
``.cs`` file into one pandas table (see ``docs/architecture.md``): one row per
particle in input order, every input column kept, plus the canonical columns
(RELION 3.1 names, optics merged into every row) and two internal ones,
``hr_stack`` (absolute path of the MRC stack) and ``hr_index`` (0-based image
index in that stack). It validates the metadata against the stack headers
(without reading pixel data) and raises :class:`InputError` naming file, row
and expectation for anything it cannot use.

The images are read by :mod:`hetrefine.io.stacks` (``iter_image_chunks``,
``read_images``).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pandas as pd

from hetrefine.ctf import CTF_FIELDS
from hetrefine.errors import InputError
from hetrefine.io.mrc import StackInfo, stack_info
from hetrefine.io.particle_checks import (
    PIXEL_RANGE_A,
    check_all_numeric_finite,
    check_physical_ranges,
    numeric_column,
    refuse_duplicated_images,
    refuse_mixed_within_group,
)
from hetrefine.io.stacks import resolve_stack, split_image_names, stack_candidates
from hetrefine.io.star import (
    check_star_text,
    read_star_blocks,
    star_string_problem,
    unwritable_string,
)

#: Canonical CTF/optics columns that must be numeric and finite in every row
#: (``hetrefine.ctf.CTF_FIELDS`` without phase shift and B-factor).
CTF_REQUIRED = CTF_FIELDS[:6]
#: Canonical columns with a default when absent (phase shift, B-factor).
CTF_DEFAULTS = dict.fromkeys(CTF_FIELDS[6:], 0.0)

CANONICAL_COLUMNS = (
    "rlnImageName",
    *CTF_REQUIRED,
    "rlnPhaseShift",
    "rlnCtfBfactor",
    "rlnImagePixelSize",
    "rlnImageSize",
    "rlnOpticsGroup",
    "hr_stack",
    "hr_index",
)

#: Block names tried, in order, when several blocks hold an rlnImageName column.
_PARTICLE_BLOCK_NAMES = ("particles", "images", "")


# --------------------------------------------------------------------------------------
# STAR -> table
# --------------------------------------------------------------------------------------


def _pick_particles_block(blocks: dict[str, pd.DataFrame], path: Path) -> tuple[str, pd.DataFrame]:
    cands = {k: v for k, v in blocks.items() if "rlnImageName" in v.columns}
    if not cands:
        empty_loops = [k for k, v in blocks.items() if len(v) == 0]
        if empty_loops:
            raise InputError(path, "the particle loop is empty (no rows)", f"data_{empty_loops[0]}")
        raise InputError(
            path,
            "no block with an _rlnImageName column: not a particle STAR file "
            f"(blocks: {', '.join('data_' + k for k in blocks)})",
        )
    if len(cands) == 1:
        return next(iter(cands.items()))
    for name in _PARTICLE_BLOCK_NAMES:
        if name in cands:
            return name, cands[name]
    raise InputError(
        path,
        "several blocks have an _rlnImageName column and none is named data_particles: "
        + ", ".join("data_" + k for k in cands),
    )


def _merge_optics(parts: pd.DataFrame, optics: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Copy each optics-group column into the particle rows of that group."""
    if "rlnOpticsGroup" not in optics.columns:
        raise InputError(path, "data_optics has no _rlnOpticsGroup column", "data_optics")
    if len(optics) == 0:
        raise InputError(path, "data_optics is empty", "data_optics")
    og = pd.to_numeric(optics["rlnOpticsGroup"], errors="coerce")
    if og.isna().any() or optics["rlnOpticsGroup"].duplicated().any():
        raise InputError(
            path, "_rlnOpticsGroup in data_optics must be unique integers", "data_optics"
        )
    optics = optics.assign(rlnOpticsGroup=og.astype(np.int64)).set_index("rlnOpticsGroup")
    if "rlnOpticsGroup" not in parts.columns:
        if len(optics) != 1:
            raise InputError(
                path,
                "particles have no _rlnOpticsGroup column but data_optics has "
                f"{len(optics)} groups",
                "data_particles",
            )
        parts = parts.assign(rlnOpticsGroup=int(optics.index[0]))
    g = pd.to_numeric(parts["rlnOpticsGroup"], errors="coerce")
    if g.isna().any():
        row = int(np.flatnonzero(g.isna().to_numpy())[0])
        raise InputError(path, "_rlnOpticsGroup is not an integer", f"row {row + 1}")
    g = g.astype(np.int64)
    unknown = ~g.isin(optics.index)
    if unknown.any():
        row = int(np.flatnonzero(unknown.to_numpy())[0])
        raise InputError(
            path,
            f"optics group {g.iloc[row]} is not defined in data_optics "
            f"(groups: {sorted(optics.index.tolist())})",
            f"row {row + 1}",
        )
    parts = parts.assign(rlnOpticsGroup=g)
    out = parts.copy()
    for col in optics.columns:
        if col in out.columns:  # a per-particle value wins over the group value
            continue
        out[col] = optics[col].reindex(g.to_numpy()).to_numpy()
    return out


def _pixel_size_from_columns(df: pd.DataFrame, path: Path) -> np.ndarray | None:
    """Per-row pixel size in Angstrom from the STAR columns, or None when they do not say."""
    if "rlnImagePixelSize" in df.columns:
        return numeric_column(df, "rlnImagePixelSize", path)
    if "rlnDetectorPixelSize" in df.columns and "rlnMagnification" in df.columns:
        det = numeric_column(df, "rlnDetectorPixelSize", path)
        mag = numeric_column(df, "rlnMagnification", path)
        if (mag <= 0).any():
            row = int(np.flatnonzero(mag <= 0)[0])
            raise InputError(path, "_rlnMagnification must be > 0", f"row {row + 1}")
        return det * 1e4 / mag
    return None


def _star_to_table(path: Path) -> pd.DataFrame:
    """Particles block of a STAR file with optics merged (no validation of CTF/images yet)."""
    blocks = read_star_blocks(path)
    name, parts = _pick_particles_block(blocks, path)
    if len(parts) == 0:
        raise InputError(path, "the particle loop is empty (no rows)", f"data_{name}")
    parts = parts.reset_index(drop=True)
    check_all_numeric_finite(parts, path)
    optics = blocks.get("optics")
    if optics is not None and "rlnImageName" not in optics.columns:
        return _merge_optics(parts, optics, path)
    return parts


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def read_particles(
    path: str | os.PathLike,
    pixel_size: float | None = None,
    project_dir: str | os.PathLike | None = None,
    check_images: bool = True,
    require_ctf: bool = True,
) -> pd.DataFrame:
    """Read a particle file into the canonical table (``docs/architecture.md``).

    path: RELION 3.0 STAR (one table), RELION 3.1+ STAR (``data_optics`` +
        particles block, any block order, particle block named ``particles``,
        ``images``, ``data_`` or anything else holding ``_rlnImageName``), or a
        CryoSPARC ``.cs`` file.
    pixel_size: Angstrom per pixel, used when the file does not give it (no
        ``_rlnImagePixelSize``, no ``_rlnDetectorPixelSize`` with
        ``_rlnMagnification``). Failing that, the stack headers' pixel size is
        used if set; otherwise an :class:`InputError` is raised.
    project_dir: last folder tried when resolving relative stack paths (after
        the metadata file's folder and its three parents).
    check_images: open each stack's header to resolve paths and check indices,
        box sizes and modes (default). ``False`` skips all stack access (for
        metadata-only use): ``hr_stack`` is then the first existing candidate
        (or the first candidate), ``rlnImageSize`` 0 when the file does not say.
        (CTF-premultiplied or phase-flipped images are refused by
        :func:`hetrefine.validation.check_particles_for_run`, before images are used.)
    require_ctf: refuse files without CTF columns (default). ``False`` (for
        metadata-only use, e.g. sub-tomogram or CTF-free projection tables)
        leaves missing CTF columns out of the table instead.

    Returns a DataFrame, one row per particle in input order, with every input
    column plus :data:`CANONICAL_COLUMNS`: defocus in Angstrom, angles in
    degrees, voltage in kV, Cs in mm, pixel size in Angstrom, box in pixels,
    ``rlnOpticsGroup`` 1-based, ``hr_stack`` absolute, ``hr_index`` 0-based.
    Pixel-unit origins (``_rlnOriginX/Y``) get ``rlnOriginXAngst/YAngst``
    companions when those are absent.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "particle file does not exist (or is not a file)")
    if path.suffix.lower() == ".cs":
        from hetrefine.io.cs import read_cs_table

        df = read_cs_table(path)
    else:
        df = _star_to_table(path)
    return _canonicalise(df, path, pixel_size, project_dir, check_images, require_ctf)


def _canonicalise(
    df: pd.DataFrame,
    path: Path,
    pixel_size: float | None,
    project_dir: str | os.PathLike | None,
    check_images: bool,
    require_ctf: bool = True,
) -> pd.DataFrame:
    df = df.copy()
    n = len(df)
    # CTF columns.
    missing = [c for c in CTF_REQUIRED if c not in df.columns]
    if missing and require_ctf:
        raise InputError(
            path,
            "missing CTF column(s) "
            + ", ".join("_" + c for c in missing)
            + " (needed per particle or per optics group)",
        )
    for col in CTF_REQUIRED:
        if col in df.columns:
            df[col] = numeric_column(df, col, path)
    for col, default in CTF_DEFAULTS.items():
        df[col] = numeric_column(df, col, path) if col in df.columns else default
    check_physical_ranges(df, path)

    # Optics groups.
    if "rlnOpticsGroup" in df.columns:
        g = numeric_column(df, "rlnOpticsGroup", path)
        if (g != np.round(g)).any() or (g < 1).any():
            row = int(np.flatnonzero((g != np.round(g)) | (g < 1))[0])
            raise InputError(path, "_rlnOpticsGroup must be an integer >= 1", f"row {row + 1}")
        df["rlnOpticsGroup"] = g.astype(np.int64)
    else:
        df["rlnOpticsGroup"] = np.int64(1)

    if check_images and "rlnImageDimensionality" in df.columns:
        dim = numeric_column(df, "rlnImageDimensionality", path)
        if (dim != 2).any():
            row = int(np.flatnonzero(dim != 2)[0])
            raise InputError(
                path,
                f"_rlnImageDimensionality is {dim[row]:g}: only 2D particle images are supported "
                "(not sub-tomograms)",
                f"row {row + 1}",
            )

    # Image names -> stacks.
    if "rlnImageName" not in df.columns:
        raise InputError(path, "no _rlnImageName column")
    idx1, stack_rel = split_image_names(df["rlnImageName"], path)
    df["hr_index"] = idx1 - 1
    uniq, first_row, inverse = np.unique(
        stack_rel.astype(str), return_index=True, return_inverse=True
    )
    infos: dict[str, StackInfo] = {}
    abs_paths: list[str] = []
    for rel, row in zip(uniq, first_row, strict=True):
        if check_images:
            p = resolve_stack(rel, path, project_dir, int(row))
            infos[rel] = stack_info(p, star=path)
            abs_paths.append(str(p))
        else:
            cands = stack_candidates(rel, path, project_dir)
            found = next((c for c in cands if c.is_file()), cands[0])
            abs_paths.append(str(found.resolve()))
    df["hr_stack"] = np.asarray(abs_paths, dtype=object)[inverse]
    # Outputs name the stacks in STAR files: refuse now what RELION could not read back
    # (a space is fine: it is written quoted, as RELION does).
    for p_abs, row in zip(abs_paths, first_row, strict=True):
        if why := star_string_problem(p_abs):
            raise InputError(
                path, f"image stack path {p_abs!r}: {why}; rename it", f"row {row + 1}"
            )

    # Index range and box, from the headers (per stack: optics groups may differ).
    header_box: np.ndarray | None = None  # per row
    header_pix = np.zeros(n)  # per row; 0 where the header does not say
    if check_images:
        n_img = np.array([infos[r].n_images for r in uniq])[inverse]
        past = df["hr_index"].to_numpy() >= n_img
        if past.any():
            row = int(np.flatnonzero(past)[0])
            raise InputError(
                path,
                f"image index {idx1[row]} is past the end of stack {df['hr_stack'].iloc[row]} "
                f"which holds {n_img[row]} images",
                f"row {row + 1}",
            )
        for rel, info in infos.items():
            if info.ny != info.nx:
                raise InputError(
                    path, f"images are {info.ny}x{info.nx}; expected square images", rel
                )
        header_box = np.array([infos[r].nx for r in uniq], dtype=np.int64)[inverse]
        # headers hold float32: take its shortest decimal (13.1, not 13.100000381)
        header_pix = np.array(
            [float(str(np.float32(infos[r].pixel_size))) for r in uniq], dtype=np.float64
        )[inverse]

    # Box size (one per optics group).
    if "rlnImageSize" in df.columns:
        size = numeric_column(df, "rlnImageSize", path)
        if header_box is not None and (size != header_box).any():
            row = int(np.flatnonzero(size != header_box)[0])
            hb = int(header_box[row])
            raise InputError(
                path,
                f"_rlnImageSize is {size[row]:g} but the stack images are {hb}x{hb} "
                f"({df['hr_stack'].iloc[row]})",
                f"row {row + 1}",
            )
        df["rlnImageSize"] = size.astype(np.int64)
    elif header_box is not None:
        df["rlnImageSize"] = header_box
    else:
        df["rlnImageSize"] = np.int64(0)  # unknown without reading the stacks
    refuse_mixed_within_group(df, "rlnImageSize", "image size", "px", path)

    # Pixel size (one per optics group).
    pix = _pixel_size_from_columns(df, path)
    if pix is None:
        if pixel_size is not None:
            pix = np.full(n, float(pixel_size))
        elif (header_pix > 0).all():
            pix = header_pix
        else:
            hint = ""
            if "rlnDetectorPixelSize" in df.columns:
                hint = " (_rlnDetectorPixelSize is given but _rlnMagnification is not)"
            raise InputError(
                path,
                "pixel size unknown: no _rlnImagePixelSize, no _rlnDetectorPixelSize with "
                f"_rlnMagnification{hint}, and the stack header pixel size is unset; "
                "pass pixel_size (Angstrom)",
            )
    if not (pix > 0).all():
        row = int(np.flatnonzero(~(pix > 0))[0])
        raise InputError(path, f"pixel size must be > 0 Angstrom, got {pix[row]}", f"row {row + 1}")
    bad = ~((pix >= PIXEL_RANGE_A[0]) & (pix <= PIXEL_RANGE_A[1]))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InputError(
            path,
            f"pixel size {pix[row]:g} A is out of range; expected {PIXEL_RANGE_A[0]:g}-"
            f"{PIXEL_RANGE_A[1]:g} Angstrom per pixel",
            f"row {row + 1}, pixel size",
        )
    df["rlnImagePixelSize"] = pix
    refuse_mixed_within_group(df, "rlnImagePixelSize", "pixel size", "A", path)

    # Origins in Angstrom (RELION 3.1 names) when only pixel origins are given.
    for ax in ("X", "Y"):
        px_col, a_col = f"rlnOrigin{ax}", f"rlnOrigin{ax}Angst"
        if px_col in df.columns and a_col not in df.columns:
            df[a_col] = numeric_column(df, px_col, path) * pix
    df["hr_index"] = df["hr_index"].astype(np.int64)
    refuse_duplicated_images(df, path)
    # every other text column is written to the output STAR files as it is
    text = [c for c in df.columns if not str(c).startswith("hr_") and c != "rlnImageName"]
    if bad := unwritable_string(df[text]):
        col, row, value, why = bad
        raise InputError(
            path,
            f"_{col} = {value!r}: {why}, so it cannot be written to the output STAR files",
            f"row {row + 1}, _{col}",
        )
    return df


def count_particles(path: str | os.PathLike) -> int:
    """Number of particles in a STAR or .cs file, cheaply (no stacks, no pandas parse).

    For STAR files the rows of the particle loop (the block holding
    ``_rlnImageName``, preferring ``data_particles``) are counted by a line
    scan; for ``.cs`` files the array length is read from the ``.npy`` header.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "particle file does not exist (or is not a file)")
    if path.suffix.lower() == ".cs":
        from hetrefine.io.cs import load_cs

        return int(load_cs(path, mmap=True).shape[0])
    return particle_loop(path)[1]


def particle_loop(path: str | os.PathLike) -> tuple[list[str], int]:
    """The labels (without ``_``) and the number of rows of a STAR file's particle loop
    (the loop holding ``_rlnImageName``; ``data_particles`` preferred), by a line scan
    that parses no row. Shared by :func:`count_particles` and the start-up checks, which
    both run when the workflow starts: the scan is cached per file and modification time."""
    p = Path(path).resolve()
    labels, n = _scan_particle_loop(str(p), p.stat().st_mtime_ns)
    return list(labels), n


@functools.lru_cache(maxsize=4)
def _scan_particle_loop(path: str, mtime_ns: int) -> tuple[tuple[str, ...], int]:
    loops: dict[str, tuple[list[str], int]] = {}
    block: str | None = None
    labels: list[str] = []
    in_loop = in_header = False
    n = 0

    def close() -> None:
        if block is not None and "rlnImageName" in labels:
            loops.setdefault(block, (labels, n))

    with open(path, encoding="utf-8-sig", errors="replace") as fh:
        for line in fh:
            s = line.strip()
            if "\ufffd" in s:  # a byte that is not UTF-8: the reader would refuse the file
                check_star_text(path)
            if not s or s.startswith("#"):
                continue
            if s.startswith("data_"):
                close()
                block, labels, in_loop, in_header, n = s[5:], [], False, False, 0
            elif s.startswith("loop_"):
                close()
                labels, in_loop, in_header, n = [], True, True, 0
            elif in_loop and s.startswith("_"):
                if not in_header:  # a new key/value after the loop ends it
                    in_loop = False
                else:
                    labels.append(s.split()[0][1:])
            elif in_loop:
                in_header = False
                n += 1
    close()
    if not loops:
        check_star_text(path)  # an MRC, numpy or UTF-16 file: say so
        raise InputError(path, "no particle loop with an _rlnImageName column")
    for name in (*_PARTICLE_BLOCK_NAMES, *loops):
        if name in loops:
            labels, n = loops[name]
            return tuple(labels), n
    raise AssertionError("unreachable")
