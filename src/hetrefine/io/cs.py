"""CryoSPARC ``.cs`` particle files (numpy structured arrays) <-> RELION-named tables.

Conversion follows pyem's ``csparc2star`` (checked against its output in the
tests): defocus ``ctf/df1_A``/``df2_A`` -> ``rlnDefocusU/V`` (Angstrom);
``ctf/df_angle_rad`` and ``ctf/phase_shift_rad`` -> degrees; optics group =
``ctf/exp_group_id + 1``; ``blob/idx`` is 0-based, so ``rlnImageName`` is
``{idx+1}@{blob/path}`` (a leading ``>`` of CryoSPARC's project-relative paths
is dropped). Poses: ``alignments3D/pose`` is a rotation vector (axis * angle,
radians) whose matrix is the transpose of RELION's ``Euler_angles2matrix``;
``alignments3D/shift`` is in pixels, so ``rlnOriginXAngst = shift_x * psize``.
Every input field is kept as a column under its own name (vector fields split
into ``name/0``, ``name/1``, ...).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial.transform import Rotation

from hetrefine.errors import InputError
from hetrefine.io.atomic import atomic_path
from hetrefine.rotations import euler_to_matrix, matrix_to_euler

CS_REQUIRED = (
    "blob/path",
    "blob/idx",
    "ctf/df1_A",
    "ctf/df2_A",
    "ctf/df_angle_rad",
    "ctf/accel_kv",
    "ctf/cs_mm",
    "ctf/amp_contrast",
)


def load_cs(path: str | os.PathLike, mmap: bool = False) -> np.ndarray:
    """The structured array (n,) of a ``.cs`` file; :class:`InputError` if it is not one."""
    path = Path(path)
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except Exception as exc:
        raise InputError(path, f"not a CryoSPARC .cs file (numpy .npy) ({exc})") from exc
    if not isinstance(arr, np.ndarray) or arr.dtype.names is None or arr.ndim != 1:
        raise InputError(path, "not a CryoSPARC .cs file: expected a 1-D structured numpy array")
    return arr


def _text(col: np.ndarray) -> np.ndarray:
    if col.dtype.kind == "S":
        return np.char.decode(col, "utf-8", errors="replace").astype(object)
    return col.astype(str).astype(object)


def read_cs_table(path: str | os.PathLike) -> pd.DataFrame:
    """A ``.cs`` file as a table with RELION 3.1 column names added (see module doc).

    Returns one row per particle: every ``.cs`` field (bytes decoded to str),
    plus ``rlnImageName``, ``rlnDefocusU/V`` (A), ``rlnDefocusAngle`` (deg),
    ``rlnVoltage`` (kV), ``rlnSphericalAberration`` (mm), ``rlnAmplitudeContrast``,
    ``rlnPhaseShift`` (deg), ``rlnCtfBfactor``, ``rlnImagePixelSize`` (A, from
    ``blob/psize_A``), ``rlnImageSize`` (from ``blob/shape``), ``rlnOpticsGroup``,
    and, when ``alignments3D`` is present, ``rlnAngleRot/Tilt/Psi`` (deg),
    ``rlnOriginXAngst/YAngst`` (A), ``rlnClassNumber`` and ``rlnRandomSubset``.
    """
    path = Path(path)
    arr = load_cs(path)
    if arr.shape[0] == 0:
        raise InputError(path, "the .cs file holds no particles")
    names = arr.dtype.names
    missing = [f for f in CS_REQUIRED if f not in names]
    if missing:
        raise InputError(path, f"missing .cs field(s) {missing} (needed for images and CTF)")
    cols: dict[str, object] = {}
    for name in names:
        col = arr[name]
        if col.ndim == 1:
            cols[name] = _text(col) if col.dtype.kind in "SUO" else col
        else:
            for j in range(col.shape[1]):
                cols[f"{name}/{j}"] = col[:, j]
    df = pd.DataFrame(cols)
    stack = pd.Series(_text(arr["blob/path"])).str.lstrip(">")
    idx = arr["blob/idx"].astype(np.int64)
    df["rlnImageName"] = [f"{i + 1:06d}@{s}" for i, s in zip(idx, stack, strict=True)]
    df["rlnDefocusU"] = arr["ctf/df1_A"].astype(np.float64)
    df["rlnDefocusV"] = arr["ctf/df2_A"].astype(np.float64)
    df["rlnDefocusAngle"] = np.degrees(arr["ctf/df_angle_rad"].astype(np.float64))
    df["rlnVoltage"] = arr["ctf/accel_kv"].astype(np.float64)
    df["rlnSphericalAberration"] = arr["ctf/cs_mm"].astype(np.float64)
    df["rlnAmplitudeContrast"] = arr["ctf/amp_contrast"].astype(np.float64)
    if "ctf/phase_shift_rad" in names:
        df["rlnPhaseShift"] = np.degrees(arr["ctf/phase_shift_rad"].astype(np.float64))
    if "ctf/bfactor" in names:
        df["rlnCtfBfactor"] = arr["ctf/bfactor"].astype(np.float64)
    if "blob/psize_A" in names:
        df["rlnImagePixelSize"] = arr["blob/psize_A"].astype(np.float64)
    if "blob/shape" in names:
        df["rlnImageSize"] = arr["blob/shape"][:, -1].astype(np.int64)
    if "ctf/exp_group_id" in names:
        df["rlnOpticsGroup"] = arr["ctf/exp_group_id"].astype(np.int64) + 1
    else:
        df["rlnOpticsGroup"] = np.int64(1)
    if "alignments3D/pose" in names:
        pose = arr["alignments3D/pose"].astype(np.float64)
        if not np.isfinite(pose).all():
            row = int(np.flatnonzero(~np.isfinite(pose).all(axis=1))[0])
            raise InputError(path, "alignments3D/pose is not finite", f"row {row + 1}")
        mats = Rotation.from_rotvec(pose).as_matrix().transpose(0, 2, 1)
        eul = matrix_to_euler(mats)
        df["rlnAngleRot"], df["rlnAngleTilt"], df["rlnAnglePsi"] = eul[:, 0], eul[:, 1], eul[:, 2]
    if "alignments3D/shift" in names:
        psize = (
            arr["alignments3D/psize_A"] if "alignments3D/psize_A" in names else arr["blob/psize_A"]
        ).astype(np.float64)
        shift = arr["alignments3D/shift"].astype(np.float64)
        df["rlnOriginXAngst"] = shift[:, 0] * psize
        df["rlnOriginYAngst"] = shift[:, 1] * psize
    if "alignments3D/class" in names:
        df["rlnClassNumber"] = arr["alignments3D/class"].astype(np.int64) + 1
    if "alignments3D/split" in names:
        df["rlnRandomSubset"] = arr["alignments3D/split"].astype(np.int64) + 1
    return df


def write_particles_cs(
    path: str | os.PathLike, particles: pd.DataFrame, extra: dict | None = None
) -> None:
    """Write a canonical particle table as a CryoSPARC ``.cs`` file, atomically.

    Fields: ``uid`` (row number), ``blob/path`` (``hr_stack``), ``blob/idx``
    (``hr_index``, 0-based), ``blob/shape``, ``blob/psize_A``, ``ctf/*`` (angles
    in radians, ``exp_group_id = rlnOpticsGroup - 1``) and, when the table has
    RELION angles, ``alignments3D/pose`` (rotation vector), ``alignments3D/shift``
    (pixels), ``alignments3D/psize_A``, and ``alignments3D/class``/``split``
    when ``rlnClassNumber``/``rlnRandomSubset`` are present. ``extra``: more fields,
    name -> array with one row per particle (e.g. ``alignments_class_0/pose``).
    """
    path = Path(path)
    df = particles
    n = len(df)
    if n == 0:
        raise InputError(path, "refusing to write a .cs file with no particles")
    stacks = df["hr_stack"].astype(str).to_numpy()
    plen = max(1, max(len(s.encode()) for s in stacks))
    fields: list[tuple] = [
        ("uid", "<u8"),
        ("blob/path", f"S{plen}"),
        ("blob/idx", "<u4"),
        ("blob/shape", "<u4", (2,)),
        ("blob/psize_A", "<f4"),
        ("ctf/type", "S9"),
        ("ctf/exp_group_id", "<u4"),
        ("ctf/accel_kv", "<f4"),
        ("ctf/cs_mm", "<f4"),
        ("ctf/amp_contrast", "<f4"),
        ("ctf/df1_A", "<f4"),
        ("ctf/df2_A", "<f4"),
        ("ctf/df_angle_rad", "<f4"),
        ("ctf/phase_shift_rad", "<f4"),
        ("ctf/bfactor", "<f4"),
    ]
    has_pose = all(c in df.columns for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"))
    if has_pose:
        fields += [
            ("alignments3D/pose", "<f4", (3,)),
            ("alignments3D/shift", "<f4", (2,)),
            ("alignments3D/psize_A", "<f4"),
        ]
        if "rlnClassNumber" in df.columns:
            fields.append(("alignments3D/class", "<u4"))
        if "rlnRandomSubset" in df.columns:
            fields.append(("alignments3D/split", "<u4"))
    extra = extra or {}
    for name, arr in extra.items():
        arr = np.asarray(arr)
        fields.append(
            (name, arr.dtype.str, arr.shape[1:]) if arr.ndim > 1 else (name, arr.dtype.str)
        )
    out = np.zeros(n, dtype=np.dtype(fields))
    for name, arr in extra.items():
        out[name] = arr
    out["uid"] = np.arange(n, dtype=np.uint64)
    out["blob/path"] = np.array([s.encode() for s in stacks], dtype=f"S{plen}")
    out["blob/idx"] = df["hr_index"].to_numpy(dtype=np.uint32)
    box = df["rlnImageSize"].to_numpy(dtype=np.uint32)
    out["blob/shape"] = np.stack([box, box], axis=1)
    psize = df["rlnImagePixelSize"].to_numpy(dtype=np.float64)
    out["blob/psize_A"] = psize
    out["ctf/type"] = b"spa"
    out["ctf/exp_group_id"] = df["rlnOpticsGroup"].to_numpy(dtype=np.int64) - 1
    out["ctf/accel_kv"] = df["rlnVoltage"].to_numpy()
    out["ctf/cs_mm"] = df["rlnSphericalAberration"].to_numpy()
    out["ctf/amp_contrast"] = df["rlnAmplitudeContrast"].to_numpy()
    out["ctf/df1_A"] = df["rlnDefocusU"].to_numpy()
    out["ctf/df2_A"] = df["rlnDefocusV"].to_numpy()
    out["ctf/df_angle_rad"] = np.radians(df["rlnDefocusAngle"].to_numpy(dtype=np.float64))
    out["ctf/phase_shift_rad"] = np.radians(df["rlnPhaseShift"].to_numpy(dtype=np.float64))
    out["ctf/bfactor"] = df["rlnCtfBfactor"].to_numpy()
    if has_pose:
        eul = df[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(dtype=np.float64)
        mats = euler_to_matrix(eul).transpose(0, 2, 1)
        out["alignments3D/pose"] = Rotation.from_matrix(mats).as_rotvec()
        ox = df["rlnOriginXAngst"].to_numpy(dtype=np.float64) if "rlnOriginXAngst" in df else 0.0
        oy = df["rlnOriginYAngst"].to_numpy(dtype=np.float64) if "rlnOriginYAngst" in df else 0.0
        out["alignments3D/shift"] = np.stack(np.broadcast_arrays(ox / psize, oy / psize), axis=1)
        out["alignments3D/psize_A"] = psize
        if "rlnClassNumber" in df.columns:
            out["alignments3D/class"] = df["rlnClassNumber"].to_numpy(dtype=np.int64) - 1
        if "rlnRandomSubset" in df.columns:
            out["alignments3D/split"] = df["rlnRandomSubset"].to_numpy(dtype=np.int64) - 1
    with atomic_path(path, suffix=".npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, out)
