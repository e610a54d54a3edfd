"""MRC maps and image stacks (CCP-EM's mrcfile), float32, voxel size in the header."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np

from hetrefine.errors import InputError
from hetrefine.io.atomic import atomic_path

#: Bytes per voxel of the MRC modes read as particle images (int8, int16, float32, uint16, float16).
_MODE_BYTES = {0: 1, 1: 2, 2: 4, 6: 2, 12: 2}
_MODE_NAMES = {0: "int8", 1: "int16", 2: "float32", 6: "uint16", 12: "float16"}


class MrcError(InputError):
    """An MRC map that cannot be used: an :class:`InputError` naming the file."""


def write_mrc(path: str | os.PathLike, data: np.ndarray, voxel_size: float) -> None:
    """Write ``data`` (a (z, y, x) volume or an (n, y, x) stack) as float32, atomically.

    ``voxel_size`` in Angstrom goes into the header so RELION, ChimeraX and
    CryoSPARC read the right pixel size. The header label is a fixed "hetrefine"
    (mrcfile's default label carries the time), so a rerun writes the same bytes.
    """
    data = np.ascontiguousarray(data, dtype=np.float32)
    is_stack = str(path).endswith(".mrcs")
    with atomic_path(path, suffix=".mrc") as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(data)
            if is_stack and data.ndim == 3:
                mrc.set_image_stack()
            mrc.voxel_size = float(voxel_size)
            mrc.update_header_stats()
            fixed_label(mrc)


def fixed_label(mrc) -> None:
    """Replace mrcfile's time-stamped header label by a fixed one (byte-stable files)."""
    mrc.header.label[0] = b"hetrefine"
    for i in range(1, 10):
        mrc.header.label[i] = b""
    mrc.header.nlabl = 1


def read_volume(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """A cubic 3D map as float32 (z, y, x) and its voxel size in Angstrom (0 if unset)."""
    path = Path(path)
    if not path.exists():
        raise MrcError(path, "map file does not exist")
    try:
        with mrcfile.open(path, permissive=True, mode="r") as mrc:
            if mrc.data is None:
                raise MrcError(path, "not a readable MRC file (no data block)")
            data = np.asarray(mrc.data, dtype=np.float32).copy()
            voxel = float(mrc.voxel_size.x)
    except MrcError:
        raise
    except Exception as exc:
        raise MrcError(path, f"cannot read as MRC ({exc})") from exc
    if data.ndim != 3 or len(set(data.shape)) != 1:
        raise MrcError(path, f"expected a cubic 3D volume, got an array of shape {data.shape}")
    if not np.all(np.isfinite(data)):
        raise MrcError(path, "map contains NaN or Inf values")
    return data, voxel


@dataclass(frozen=True)
class StackInfo:
    """What the header of one MRC stack says (no pixel data read).

    ``n_images``: number of 2D images (nz; 1 for a single 2D image file);
    ``box``: (ny, nx) in pixels; ``pixel_size``: Angstrom (0 if unset);
    ``mode``: MRC mode number.
    """

    path: Path
    n_images: int
    ny: int
    nx: int
    pixel_size: float
    mode: int


def stack_info(path: str | os.PathLike, star: str | os.PathLike | None = None) -> StackInfo:
    """Read and check the header of an MRC image stack.

    Refuses (with :class:`InputError` naming ``path``): unreadable headers,
    unsupported modes (complex, 4-bit, RGB), a file shorter than the header
    says (truncated), and a cubic 3D volume flagged as a volume (space group
    >= 1 and nx == ny == nz), which is a map given where a stack was expected.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, header_only=True, permissive=True) as mrc:
                h = mrc.header
                nx, ny, nz = int(h.nx), int(h.ny), int(h.nz)
                mode = int(h.mode)
                ispg = int(h.ispg)
                nsymbt = int(h.nsymbt)
                vs = mrc.voxel_size
                pix = float(vs.x)
    except Exception as exc:
        raise InputError(path, f"cannot read the MRC header ({exc})") from exc
    if nx <= 0 or ny <= 0 or nz <= 0:
        raise InputError(path, f"MRC header has non-positive dimensions nx={nx} ny={ny} nz={nz}")
    if mode not in _MODE_BYTES:
        raise InputError(
            path,
            f"MRC mode {mode} is not supported for particle images "
            f"(expected one of {sorted(_MODE_NAMES.items())})",
        )
    expected = 1024 + nsymbt + nx * ny * nz * _MODE_BYTES[mode]
    size = path.stat().st_size
    if size < expected:
        n_whole = max(0, (size - 1024 - nsymbt) // (nx * ny * _MODE_BYTES[mode]))
        raise InputError(
            path,
            f"stack is truncated: header says {nz} images of {ny}x{nx} ({expected} bytes) "
            f"but the file has {size} bytes (only {n_whole} whole images)",
            f"image {n_whole + 1}",
        )
    if nz > 1 and nx == ny == nz and ispg >= 1:
        raise InputError(
            path,
            f"this is a 3D volume ({nx}^3, space group {ispg}), not a stack of 2D images"
            + (f"; it is referenced as a particle stack by {star}" if star else ""),
            "image 1",
        )
    if not np.isfinite(pix) or pix < 0:
        pix = 0.0
    return StackInfo(path=path, n_images=nz, ny=ny, nx=nx, pixel_size=pix, mode=mode)
