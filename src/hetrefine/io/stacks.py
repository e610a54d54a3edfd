"""Where a particle's image is, and reading images lazily from MRC stacks.

``resolve_stack`` finds the stack a particle file names (relative to the file's
folder, its parents, or the project folder); ``split_image_names`` parses
RELION's ``index@stack`` names; ``iter_image_chunks`` reads the images of a
canonical particle table (``hr_stack``, ``hr_index``) a chunk at a time from
memory-mapped stacks, in row order, as float32.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd

from hetrefine.errors import InputError
from hetrefine.io.mrc import stack_info


def stack_candidates(
    rel: str, meta_path: Path, project_dir: str | os.PathLike | None
) -> list[Path]:
    """Where a stack named ``rel`` in ``meta_path`` may be, in the order tried."""
    p = Path(rel)
    if p.is_absolute():
        return [p]
    base = meta_path.resolve().parent
    out = [base / p]
    for parent in list(base.parents)[:3]:  # RELION project dir convention: Class3D/job001/...
        out.append(parent / p)
    if project_dir is not None:
        out.append(Path(project_dir).resolve() / p)
    return out


def resolve_stack(
    rel: str, meta_path: Path, project_dir: str | os.PathLike | None, row: int
) -> Path:
    """Absolute path of the stack ``rel`` named at ``row`` of ``meta_path`` (see module doc)."""
    cands = stack_candidates(rel, meta_path, project_dir)
    for c in cands:
        if c.is_file():
            return c.resolve()
    tried = ", ".join(str(c) for c in cands)
    windows = "\\" in rel and "/" not in rel
    raise InputError(
        meta_path,
        f"image stack '{rel}' not found; tried {tried}"
        + ("" if project_dir is not None else " (pass project_dir if paths are relative to it)")
        + ("; the path has backslashes (Windows): write it with / instead" if windows else ""),
        f"row {row + 1}",
    )


def split_image_names(names: pd.Series, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``idx@stack`` strings -> (1-based indices int64, stack strings). No ``@``: index 1."""
    if names.isna().any():
        row = int(np.flatnonzero(names.isna().to_numpy())[0])
        raise InputError(path, "rlnImageName is empty", f"row {row + 1}")
    s = names.astype(str).str.strip()
    has_at = s.str.contains("@", regex=False)
    parts = s.str.split("@", n=1, expand=True)
    if parts.shape[1] == 1:
        parts[1] = None
    idx_str = parts[0].where(has_at, "1")
    stack = parts[1].where(has_at, s)
    idx = pd.to_numeric(idx_str, errors="coerce")
    bad = idx.isna() | (idx != np.floor(idx.fillna(0)))
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise InputError(
            path,
            f"rlnImageName '{s.iloc[row]}' is not of the form <index>@<stack> with an integer index",
            f"row {row + 1}",
        )
    idx = idx.to_numpy(dtype=np.int64)
    if (idx < 1).any():
        row = int(np.flatnonzero(idx < 1)[0])
        raise InputError(
            path,
            f"image index {idx[row]} in '{s.iloc[row]}': indices in <index>@<stack> are 1-based (>= 1)",
            f"row {row + 1}",
        )
    empty = stack.str.len() == 0
    if empty.any():
        row = int(np.flatnonzero(empty.to_numpy())[0])
        raise InputError(path, f"rlnImageName '{s.iloc[row]}' has no stack path", f"row {row + 1}")
    return idx, stack.to_numpy(dtype=object)


def _open_stack(path: str) -> mrcfile.mrcfile.MrcFile:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mrc = mrcfile.mmap(path, mode="r", permissive=True)
    except Exception as exc:
        raise InputError(path, f"cannot open as an MRC stack ({exc})") from exc
    if mrc.data is None:
        mrc.close()
        raise InputError(path, "MRC data block unreadable (truncated or corrupt file)")
    return mrc


def _read_from_stack(path: str, index: np.ndarray) -> np.ndarray:
    """Images ``index`` (0-based, (m,)) of the stack at ``path`` as float32 (m, ny, nx)."""
    info = stack_info(path)
    if index.size and int(index.max()) >= info.n_images:
        bad = int(index.max())
        raise InputError(
            path,
            f"image {bad + 1} requested but the stack holds {info.n_images}",
            f"image {bad + 1}",
        )
    mrc = _open_stack(path)
    try:
        data = mrc.data
        if data.ndim == 2:
            data = data[np.newaxis]
        # Contiguous runs are sliced (one read), others gathered.
        if index.size and np.all(np.diff(index) == 1):
            block = data[int(index[0]) : int(index[-1]) + 1]
        else:
            block = data[index]
        out = np.array(block, dtype=np.float32)  # a copy: never a view into the map
    finally:
        mrc.close()
    finite = np.isfinite(out).reshape(len(out), -1).all(axis=1)
    if not finite.all():
        k = int(np.flatnonzero(~finite)[0])
        raise InputError(
            path, "image contains NaN or Inf pixel values", f"image {int(index[k]) + 1} (1-based)"
        )
    return out


def iter_image_chunks(
    table: pd.DataFrame, chunk_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(positions, images)`` for consecutive chunks of ``table``, in row order.

    positions: int64 (m,), row positions (0-based, ``iloc``) of the chunk's rows;
    images: float32 (m, box, box), read from memory-mapped stacks (``hr_stack``,
    ``hr_index``) and converted from any of the MRC modes int8/int16/uint16/
    float16/float32. Consecutive rows of the same stack are read together. At
    most ``chunk_size`` images are in memory at a time (plus the caller's). Where
    the image size changes (optics groups with different boxes) a chunk is
    yielded in pieces of one size each.
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    stacks = table["hr_stack"].to_numpy()
    index = table["hr_index"].to_numpy(dtype=np.int64)
    n = len(table)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        pieces: list[np.ndarray] = []
        first = start  # row of pieces[0]
        a = start
        while a < stop:
            b = a + 1
            while b < stop and stacks[b] == stacks[a]:
                b += 1
            block = _read_from_stack(str(stacks[a]), index[a:b])
            if pieces and block.shape[1:] != pieces[0].shape[1:]:  # another optics group's box
                yield np.arange(first, a, dtype=np.int64), np.concatenate(pieces, axis=0)
                pieces, first = [], a
            pieces.append(block)
            a = b
        yield np.arange(first, stop, dtype=np.int64), np.concatenate(pieces, axis=0)


def read_images(table: pd.DataFrame) -> np.ndarray:
    """All images of a (small) table as float32 (n, box, box), in row order."""
    if len(table) == 0:
        raise ValueError("read_images: empty table")
    chunks = [imgs for _, imgs in iter_image_chunks(table, 4096)]
    if len({c.shape[1:] for c in chunks}) > 1:
        raise ValueError("read_images: images of different sizes (read one optics group at a time)")
    return np.concatenate(chunks, axis=0)
