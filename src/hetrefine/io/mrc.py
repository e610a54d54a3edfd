"""MRC maps and image stacks (CCP-EM's mrcfile), float32, voxel size in the header."""

from __future__ import annotations

import os
from pathlib import Path

import mrcfile
import numpy as np

from hetrefine.io.atomic import atomic_path


class MrcError(ValueError):
    """An MRC file that cannot be used, with the file named in the message."""


def write_mrc(path: str | os.PathLike, data: np.ndarray, voxel_size: float) -> None:
    """Write ``data`` (a (z, y, x) volume or an (n, y, x) stack) as float32, atomically.

    ``voxel_size`` in Angstrom goes into the header so RELION, ChimeraX and
    CryoSPARC read the right pixel size.
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


def read_volume(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """A cubic 3D map as float32 (z, y, x) and its voxel size in Angstrom (0 if unset)."""
    path = Path(path)
    if not path.exists():
        raise MrcError(f"{path}: map file does not exist")
    try:
        with mrcfile.open(path, permissive=True, mode="r") as mrc:
            if mrc.data is None:
                raise MrcError(f"{path}: not a readable MRC file (no data block)")
            data = np.asarray(mrc.data, dtype=np.float32).copy()
            voxel = float(mrc.voxel_size.x)
    except MrcError:
        raise
    except Exception as exc:
        raise MrcError(f"{path}: cannot read as MRC ({exc})") from exc
    if data.ndim != 3 or len(set(data.shape)) != 1:
        raise MrcError(
            f"{path}: expected a cubic 3D volume, got an array of shape {data.shape}"
        )
    if not np.all(np.isfinite(data)):
        raise MrcError(f"{path}: map contains NaN or Inf values")
    return data, voxel
