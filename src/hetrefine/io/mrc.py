"""MRC maps and image stacks (CCP-EM's mrcfile), float32, voxel size in the header."""

from __future__ import annotations

import logging
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


log = logging.getLogger(__name__)


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


#: Leading bytes of files that are not MRC (checked before the MRC header is parsed).
_NOT_MRC_SIGNATURES: tuple[tuple[bytes, str, str], ...] = (
    (
        b"\x1f\x8b",
        "gzip-compressed",
        "decompress it first, e.g. gzip -dc '{name}' > '{stem}_plain{suffix}' (or rename it "
        "to '{name}.gz' and run gunzip on it), and point the input at the decompressed file",
    ),
    (b"BZh", "bzip2-compressed", "decompress it first (bunzip2 -k) and point the input at it"),
    (b"\xfd7zXZ\x00", "xz-compressed", "decompress it first (unxz -k) and point the input at it"),
    (
        b"\x28\xb5\x2f\xfd",
        "zstd-compressed",
        "decompress it first (unzstd) and point the input at it",
    ),
    (b"PK\x03\x04", "a zip archive", "extract the MRC file(s) from it first"),
    (b"II*\x00", "a TIFF image", "particles and maps must be MRC files"),
    (b"MM\x00*", "a TIFF image", "particles and maps must be MRC files"),
    (b"\x89PNG", "a PNG image", "particles and maps must be MRC files"),
    (b"\xff\xd8\xff", "a JPEG image", "particles and maps must be MRC files"),
    (b"\x89HDF", "an HDF5 file", "particles and maps must be MRC files"),
    (
        b"\x93NUMPY",
        "a numpy .npy file (a CryoSPARC .cs?)",
        "give it as the particle file, not as an image stack or map",
    ),
)
#: MRC modes defined by the MRC2014 standard (and IMOD's 101).
_KNOWN_MODES = {0, 1, 2, 3, 4, 6, 12, 101}


#: A non-cubic map is padded to a cube unless its shortest side (after resampling to
#: isotropic voxels) is under 1/MAX_ASPECT of its longest: then it is refused.
MAX_ASPECT = 4


def check_is_mrc(path: str | os.PathLike, error: type[InputError] = InputError) -> None:
    """Refuse a file that is not an MRC file, saying what it is (compressed, an image
    format, text, too short) and what to do, without echoing its bytes; raises ``error``."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(1024)
    except OSError as exc:
        raise error(path, f"cannot read the file ({exc.strerror or exc})") from exc
    for magic, what, todo in _NOT_MRC_SIGNATURES:
        if head.startswith(magic):
            todo = todo.format(name=path.name, stem=path.stem, suffix=path.suffix)
            raise error(path, f"is {what}, not an MRC file: {todo}")
    if len(head) < 1024:
        raise error(
            path, f"is not an MRC file: {len(head)} bytes, shorter than the 1024-byte MRC header"
        )
    mode = int(np.frombuffer(head[12:16], "<i4")[0])
    mode_be = int(np.frombuffer(head[12:16], ">i4")[0])
    has_map_id = head[208:212] == b"MAP "
    if not has_map_id and mode not in _KNOWN_MODES and mode_be not in _KNOWN_MODES:
        printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in head) / len(head)
        what = "a text file (a STAR file?)" if printable > 0.95 else "not recognised"
        raise error(
            path,
            f"is not an MRC file: no MRC map identifier and no valid MRC data mode in its "
            f"header ({what})",
        )


def read_volume(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """A 3D map as a float32 cube (z, y, x) and its voxel size in Angstrom (0 if unset).

    Maps as EMDB distributes them are made usable, and what was done is logged:

    - the data are put in (z, y, x) order through the header's axis order
      (``mapc``, ``mapr``, ``maps``: which of X, Y, Z the columns, rows and sections are);
    - anisotropic voxels (``cella / (mx, my, mz)`` differing by more than 0.1 %) are
      resampled (cubic spline) to isotropic voxels of the smallest of the three sizes,
      keeping the voxel ``n // 2`` of every axis at the same place;
    - a non-cubic map is padded to a cube of its largest side, around its centre
      (voxel ``n // 2`` goes to ``L // 2``), with the mean of its outer faces.

    Refused, in one line naming the file: a missing or non-MRC file, a 2D image, a slab
    (shortest side under 1/:data:`MAX_ASPECT` of the longest, e.g. 7 x 320 x 320 images),
    a stack of volumes, an axis order that is not a permutation of 1, 2, 3, a voxel size set on
    some axes only, NaN or Inf values.
    """
    path = Path(path)
    if not path.exists():
        raise MrcError(path, "map file does not exist")
    check_is_mrc(path, MrcError)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, permissive=True, mode="r") as mrc:
                if mrc.data is None:
                    raise MrcError(path, "not a readable MRC file (no data block)")
                data = np.asarray(mrc.data, dtype=np.float32).copy()
                h = mrc.header
                axes = (int(h.mapc), int(h.mapr), int(h.maps))
                vs = mrc.voxel_size
                voxel_xyz = (float(vs.x), float(vs.y), float(vs.z))
    except MrcError:
        raise
    except Exception as exc:
        raise MrcError(path, f"cannot read as MRC ({exc})") from exc
    if data.ndim == 2 or (data.ndim == 3 and data.shape[0] == 1):
        raise MrcError(
            path,
            f"is a 2D image of shape {data.shape}, not a 3D map "
            "(expected a cubic 3D volume, or a 3D map to pad to one)",
        )
    if data.ndim != 3:
        raise MrcError(path, f"expected one 3D map, got an array of shape {data.shape}")
    if not np.all(np.isfinite(data)):
        raise MrcError(path, "map contains NaN or Inf values")
    done: list[str] = []
    if axes != (1, 2, 3):
        if sorted(axes) != [1, 2, 3]:
            raise MrcError(
                path,
                f"header axis order (mapc, mapr, maps) = {axes} is not a permutation of "
                "(1, 2, 3); cannot tell which axis is X, Y or Z",
            )
        # data axes are (sections, rows, columns) = labels (maps, mapr, mapc)
        label_of_axis = (axes[2], axes[1], axes[0])
        data = np.ascontiguousarray(data.transpose([label_of_axis.index(k) for k in (3, 2, 1)]))
        done.append(f"read through its axis order (mapc, mapr, maps) = {axes} as (z, y, x)")
    vx, vy, vz = voxel_xyz
    voxel = vx
    finite_pos = [v > 0 and np.isfinite(v) for v in voxel_xyz]
    if any(finite_pos) and not all(finite_pos):
        raise MrcError(
            path,
            f"voxel size is set on some axes only ((x, y, z) = {vx:g}, {vy:g}, {vz:g} A); "
            "set cella and mx/my/mz for all three",
        )
    if all(finite_pos) and max(voxel_xyz) > min(voxel_xyz) * 1.001:
        voxel = min(voxel_xyz)
        before = data.shape
        data = _resample_axes(data, (vz / voxel, vy / voxel, vx / voxel))
        done.append(
            f"resampled from voxels of {vx:.4g} x {vy:.4g} x {vz:.4g} A (x, y, z) to "
            f"{voxel:.4g} A isotropic, {before} -> {data.shape} (z, y, x)"
        )
    if not all(finite_pos):
        voxel = 0.0
    if min(data.shape) * MAX_ASPECT < max(data.shape):
        raise MrcError(
            path,
            f"a map of {data.shape} voxels (z, y, x) is a slab (shortest side under 1/"
            f"{MAX_ASPECT} of the longest), not the map of a particle: is it a stack of 2D "
            "images? Expected a 3D map (any shape is padded to a cube)",
        )
    if len(set(data.shape)) != 1:
        before = data.shape
        data, background = _pad_to_cube(data)
        done.append(
            f"padded from {before} (z, y, x) to a {data.shape[0]}^3 cube around the map's "
            f"centre with its edge mean {background:.4g}"
        )
    if done:
        log.info("%s: %s", path, "; ".join(done))
    return data, voxel


def _resample_axes(data: np.ndarray, factors: tuple[float, float, float]) -> np.ndarray:
    """Resample (z, y, x) data by per-axis factors (new voxels per old voxel), cubic
    spline; the voxel ``n // 2`` of every axis keeps its place."""
    import scipy.ndimage

    old = np.array(data.shape)
    new = np.maximum(1, np.round(old * np.asarray(factors)).astype(int))
    step = 1.0 / np.asarray(factors)  # old voxels per new voxel
    offset = old // 2 - step * (new // 2)
    out = scipy.ndimage.affine_transform(
        data.astype(np.float64), step, offset=offset, output_shape=tuple(new), order=3,
        mode="nearest",
    )  # fmt: skip
    return out.astype(np.float32)


def _pad_to_cube(data: np.ndarray) -> tuple[np.ndarray, float]:
    """A cube of the largest side with ``data`` centred (index n // 2 -> L // 2), filled
    with the mean of the data's six outer faces; and that fill value."""
    faces = [data[0], data[-1], data[:, 0], data[:, -1], data[:, :, 0], data[:, :, -1]]
    background = float(np.mean(np.concatenate([f.ravel() for f in faces])))
    side = max(data.shape)
    out = np.full((side,) * 3, background, dtype=np.float32)
    lo = [side // 2 - n // 2 for n in data.shape]
    out[
        lo[0] : lo[0] + data.shape[0], lo[1] : lo[1] + data.shape[1], lo[2] : lo[2] + data.shape[2]
    ] = data
    return out, background


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

    Refuses (with :class:`InputError` naming ``path``): a file that is not MRC
    (compressed, another image format, text: :func:`check_is_mrc`), unreadable
    headers, unsupported modes (complex, 4-bit, RGB), a file shorter than the
    header says (truncated), and a cubic 3D volume flagged as a volume (space
    group >= 1 and nx == ny == nz) not named ``.mrcs``, which is a map given where
    a stack was expected. A ``.mrcs`` is a stack whatever its space group, as in RELION.
    """
    path = Path(path)
    check_is_mrc(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, header_only=True, permissive=True) as mrc:
                h = mrc.header
                nx, ny, nz = int(h.nx), int(h.ny), int(h.nz)
                mode = int(h.mode)
                ispg = int(h.ispg)
                mz = int(h.mz)
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
    # Space groups 401-630 mark a stack of 3D volumes (mz sections each): mrcfile then
    # reads a 4D array, which no index@stack name can address as a 2D image.
    if 401 <= ispg <= 630 and 1 < mz < nz:
        raise InputError(
            path,
            f"is a stack of {nz // mz} 3D volumes of {nx}x{ny}x{mz} (space group {ispg}), "
            "not a stack of 2D images"
            + (f"; it is referenced as a particle stack by {star}" if star else "")
            + " (sub-tomograms are not supported; particles must be 2D images)",
        )
    # A cube flagged as a volume (space group >= 1) is a map given where a stack is
    # expected, unless it is named .mrcs: RELION reads a .mrcs as a stack whatever its
    # space group, and mrcfile writes space group 1 unless told it is a stack.
    if nz > 1 and nx == ny == nz and ispg >= 1 and path.suffix.lower() != ".mrcs":
        raise InputError(
            path,
            f"this is a 3D volume ({nx}^3, space group {ispg}), not a stack of 2D images"
            + (f"; it is referenced as a particle stack by {star}" if star else "")
            + " (if it is a stack of images, name it .mrcs or set its space group to 0)",
            "image 1",
        )
    if not np.isfinite(pix) or pix < 0:
        pix = 0.0
    return StackInfo(path=path, n_images=nz, ny=ny, nx=nx, pixel_size=pix, mode=mode)
