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
into ``name/0``, ``name/1``, ...), so :func:`particles_cs_array` writes them back as
they were, with ``uid``; the heterogeneous-refinement fields follow CryoSPARC's own
outputs (``alignments3D`` and ``alignments_class_k``, dtypes as in a real
CryoSPARC refinement's file, checked in the tests).
"""

from __future__ import annotations

import os
import re
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
    with open(path, "rb") as fh:
        head = fh.read(512)
    if not head.startswith(b"\x93NUMPY"):
        printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in head) / max(len(head), 1)
        if head.startswith(b"PK\x03\x04"):
            what = "a zip archive (a numpy .npz?)"
        elif head and printable > 0.95:
            what = "a text file" + (" (a STAR file: name it .star)" if b"data_" in head else "")
        else:
            what = "not a numpy file"
        raise InputError(
            path, f"is {what}, not a CryoSPARC .cs file (a numpy .npy structured array)"
        )
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except ValueError as exc:
        if "pickled" in str(exc) or "allow_pickle" in str(exc):
            raise InputError(
                path,
                "holds Python objects (pickled data), which are never loaded (they can run "
                "code): a CryoSPARC .cs file is a structured array of plain fields",
            ) from None
        raise InputError(path, f"not a readable CryoSPARC .cs file ({exc})") from None
    except Exception as exc:
        raise InputError(path, f"not a readable CryoSPARC .cs file ({exc})") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.names is None or arr.ndim != 1:
        raise InputError(path, "not a CryoSPARC .cs file: expected a 1-D structured numpy array")
    return arr


def _refuse_degrees(path: Path, field: str, values: np.ndarray) -> None:
    """An angle field in radians beyond +-2 pi holds degrees (a hand-made or converted
    file): refused, naming the row, as it would turn every CTF by the wrong angle."""
    v = np.asarray(values, dtype=np.float64)
    bad = np.abs(v) > 2 * np.pi * 1.001
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InputError(
            path,
            f"{field} is {v[row]:g}; expected radians (-2 pi to 2 pi); {v[row]:g} looks like "
            f"degrees: write {np.radians(v[row]):.4g}",
            f"row {row + 1}, {field}",
        )


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
    for field in ("ctf/df_angle_rad", "ctf/phase_shift_rad"):
        if field in names:
            _refuse_degrees(path, field, arr[field])
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


#: A column of the table that is a ``.cs`` field (``group/name``) or one component
#: of a vector field (``group/name/j``), as :func:`read_cs_table` names them.
_FIELD_COLUMN = re.compile(r"^(?P<field>[^/]+/[^/]+)(?:/(?P<j>\d+))?$")

#: Field groups a refinement's output replaces: written afresh from our results, never
#: copied from the input (an input's poses from an earlier job would be stale).
_REPLACED_GROUP = re.compile(r"^(alignments3D|alignments_class_\d+)/")


def input_cs_fields(particles: pd.DataFrame) -> list[tuple[str, np.ndarray]]:
    """The ``.cs`` fields of a table read from a ``.cs`` file, rebuilt from its columns.

    ``uid`` and every ``group/name`` column (vector fields from their ``group/name/j``
    components), in the table's column order, values and numeric dtypes as read;
    text fields as ``S<longest>`` bytes (UTF-8); ``uid`` 0..N-1 first if the input had
    none. Empty for a table read from STAR (no ``blob/path`` column).
    """
    if "blob/path" not in particles.columns:
        return []
    parts: dict[str, list[tuple[int, str]]] = {}
    for col in particles.columns:
        m = _FIELD_COLUMN.match(str(col))
        if col == "uid" or m:
            field, j = ("uid", None) if col == "uid" else (m["field"], m["j"])
            parts.setdefault(field, []).append((-1 if j is None else int(j), col))
    out = []
    if "uid" not in parts:
        out.append(("uid", np.arange(len(particles), dtype=np.uint64)))
    for name, cols in parts.items():
        if len(cols) == 1 and cols[0][0] == -1:
            out.append((name, _field_array(particles[cols[0][1]])))
        else:
            comps = [particles[c].to_numpy() for _, c in sorted(cols)]
            out.append((name, np.stack(comps, axis=1)))
    return out


def _field_array(col: pd.Series) -> np.ndarray:
    v = col.to_numpy()
    if v.dtype.kind not in "biufc":  # text (str objects after the table round trip)
        enc = [str(x).encode() for x in v]
        return np.array(enc, dtype=f"S{max([1, *map(len, enc)])}")
    return v


def _base_fields(df: pd.DataFrame) -> list[tuple[str, np.ndarray]]:
    """uid, blob/* and ctf/* from the canonical (RELION-named) columns of a STAR input."""
    n = len(df)
    stacks = df["hr_stack"].astype(str).to_numpy()
    box = df["rlnImageSize"].to_numpy(dtype=np.uint32)
    deg = np.radians
    f4 = np.float32
    return [
        ("uid", np.arange(n, dtype=np.uint64)),
        ("blob/path", np.array([s.encode() for s in stacks], dtype=bytes)),
        ("blob/idx", df["hr_index"].to_numpy(dtype=np.uint32)),
        ("blob/shape", np.stack([box, box], axis=1)),
        ("blob/psize_A", df["rlnImagePixelSize"].to_numpy(dtype=f4)),
        ("ctf/type", np.full(n, b"spa", dtype="S9")),
        ("ctf/exp_group_id", (df["rlnOpticsGroup"].to_numpy(dtype=np.int64) - 1).astype("<u4")),
        ("ctf/accel_kv", df["rlnVoltage"].to_numpy(dtype=f4)),
        ("ctf/cs_mm", df["rlnSphericalAberration"].to_numpy(dtype=f4)),
        ("ctf/amp_contrast", df["rlnAmplitudeContrast"].to_numpy(dtype=f4)),
        ("ctf/df1_A", df["rlnDefocusU"].to_numpy(dtype=f4)),
        ("ctf/df2_A", df["rlnDefocusV"].to_numpy(dtype=f4)),
        ("ctf/df_angle_rad", deg(df["rlnDefocusAngle"].to_numpy(dtype=np.float64)).astype(f4)),
        ("ctf/phase_shift_rad", deg(df["rlnPhaseShift"].to_numpy(dtype=np.float64)).astype(f4)),
        ("ctf/bfactor", df["rlnCtfBfactor"].to_numpy(dtype=f4)),
    ]


def _pixel_size(df: pd.DataFrame) -> np.ndarray:
    if "blob/psize_A" in df.columns:
        return df["blob/psize_A"].to_numpy(dtype=np.float64)
    return df["rlnImagePixelSize"].to_numpy(dtype=np.float64)


def euler_to_pose(euler: np.ndarray) -> np.ndarray:
    """RELION ZYZ Euler angles (n, 3) in degrees -> CryoSPARC ``pose`` (n, 3) float32:
    the rotation vector (axis * angle, radians) of the transpose of RELION's matrix."""
    mats = euler_to_matrix(np.asarray(euler, dtype=np.float64)).transpose(0, 2, 1)
    return Rotation.from_matrix(mats).as_rotvec().astype(np.float32)


def _pose_fields(df: pd.DataFrame) -> list[tuple[str, np.ndarray]]:
    """``alignments3D`` from the table's RELION angles, origins, class and half-set."""
    if not all(c in df.columns for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")):
        return []
    psize = _pixel_size(df)
    eul = df[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(dtype=np.float64)
    ox = df["rlnOriginXAngst"].to_numpy(dtype=np.float64) if "rlnOriginXAngst" in df else 0.0
    oy = df["rlnOriginYAngst"].to_numpy(dtype=np.float64) if "rlnOriginYAngst" in df else 0.0
    out = [
        ("alignments3D/pose", euler_to_pose(eul)),
        (
            "alignments3D/shift",
            np.stack(np.broadcast_arrays(ox / psize, oy / psize), 1).astype("<f4"),
        ),
        ("alignments3D/psize_A", psize.astype(np.float32)),
    ]
    for col, name in (("rlnClassNumber", "class"), ("rlnRandomSubset", "split")):
        if col in df.columns:
            out.append(
                (f"alignments3D/{name}", (df[col].to_numpy(dtype=np.int64) - 1).astype("<u4"))
            )
    return out


def hetero_refine_fields(assign: dict, psize: np.ndarray) -> dict[str, np.ndarray]:
    """CryoSPARC's heterogeneous-refinement fields for every particle.

    ``assign``: ``posterior`` (n, K), ``euler`` (n, K, 3) RELION degrees, ``shift``
    (n, K, 2) Angstrom (RELION origin convention), ``half`` (n,) 0/1, optionally
    ``scale`` (n, K) (per-particle intensity scale); ``psize``: (n,) Angstrom.
    Returns, with CryoSPARC's names and dtypes (as in its own refinement outputs):
    ``alignments3D/*`` for the chosen class (argmax of the posterior) and
    ``alignments_class_k/*`` per 0-based class k, each with ``pose`` (3,) f4 rotation
    vector, ``shift`` (2,) f4 pixels, ``psize_A`` f4, ``split`` u4, ``class`` u4,
    ``class_posterior`` f4 and, with ``scale``, ``alpha`` f4.
    """
    from hetrefine.classification import hard_classes

    post = np.asarray(assign["posterior"], dtype=np.float32)
    n, k = post.shape
    euler = np.asarray(assign["euler"], dtype=np.float64)
    shift = np.asarray(assign["shift"], dtype=np.float64) / np.asarray(psize)[:, None, None]
    scale = np.asarray(assign["scale"], dtype=np.float32) if "scale" in assign else None
    best = hard_classes(assign["posterior"])
    rows = np.arange(n)

    def group(prefix: str, cls: np.ndarray) -> dict[str, np.ndarray]:
        g = {
            "pose": euler_to_pose(euler[rows, cls]),
            "shift": shift[rows, cls].astype(np.float32),
            "psize_A": np.asarray(psize, dtype=np.float32),
            "split": np.asarray(assign["half"]).astype(np.uint32),
            "class": cls.astype(np.uint32),
            "class_posterior": post[rows, cls],
        }
        if scale is not None:
            g["alpha"] = scale[rows, cls]
        return {f"{prefix}/{name}": v for name, v in g.items()}

    out = group("alignments3D", best)
    for j in range(k):
        out.update(group(f"alignments_class_{j}", np.full(n, j)))
    return out


def particles_cs_array(particles: pd.DataFrame, extra: dict | None = None) -> np.ndarray:
    """A particle table as a CryoSPARC ``.cs`` structured array (n,).

    Base fields: for a table read from a ``.cs`` file, every input field and ``uid``
    as they were (:func:`input_cs_fields`), except the ``alignments3D`` and
    ``alignments_class_k`` groups when this function writes them afresh; for a table
    read from STAR, ``uid`` (row number 0..N-1), ``blob/path`` (``hr_stack``),
    ``blob/idx`` (``hr_index``, 0-based), ``blob/shape``, ``blob/psize_A``, ``ctf/*``
    (angles in radians, ``exp_group_id = rlnOpticsGroup - 1``). Then, when the table
    has RELION angles, ``alignments3D/pose`` (rotation vector), ``shift`` (pixels),
    ``psize_A`` and ``class``/``split`` (from ``rlnClassNumber``/``rlnRandomSubset``);
    then ``extra`` (name -> array with one row per particle), which replaces any
    field group (``alignments3D``, ``alignments_class_k``) it writes.
    """
    extra = dict(extra or {})
    new = dict(_pose_fields(particles))
    new.update(extra)
    base = input_cs_fields(particles) or _base_fields(particles)
    groups = {m[1] for name in new if (m := _REPLACED_GROUP.match(name))}
    fields = [
        (name, v) for name, v in base
        if not ((m := _REPLACED_GROUP.match(name)) and m[1] in groups) and name not in new
    ] + list(new.items())  # fmt: skip
    n = len(particles)
    dtype = []
    for name, v in fields:
        v = np.asarray(v)
        if v.dtype.kind == "S" and v.dtype.itemsize == 0:
            v = v.astype("S1")
        if v.shape[:1] != (n,):
            raise ValueError(f".cs field {name} has shape {v.shape}, expected ({n}, ...)")
        dtype.append((name, v.dtype.str, v.shape[1:]))
    out = np.zeros(n, dtype=np.dtype(dtype))
    for name, v in fields:
        out[name] = v
    return out


def save_cs(path: str | os.PathLike, arr: np.ndarray) -> None:
    """Write a structured array as a ``.cs`` file (numpy ``.npy``), atomically; may be empty."""
    with atomic_path(Path(path), suffix=".npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, arr)


def write_particles_cs(
    path: str | os.PathLike, particles: pd.DataFrame, extra: dict | None = None
) -> None:
    """Write a particle table as a CryoSPARC ``.cs`` file, atomically
    (fields: :func:`particles_cs_array`)."""
    if len(particles) == 0:
        raise InputError(Path(path), "refusing to write a .cs file with no particles")
    save_cs(path, particles_cs_array(particles, extra))
