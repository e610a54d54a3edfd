"""Final user-facing files: particle STAR and .cs files with classes and poses, class maps,
FSC, zip. Draws nothing (the figures are ``hetrefine.plots``'s).

Conventions (see ``docs/architecture.md``):

- The particle table is the canonical table (RELION 3.1 column names without
  the leading underscore, as ``starfile`` reads them; optics merged in every
  row; internal ``hr_stack``/``hr_index`` columns).
- Assignments come from the align step's per-shard npz files: ``index`` (n,)
  rows into the table, ``half`` (n,) 0/1, ``posterior`` (n, K), ``euler``
  (n, K, 3) RELION ZYZ rot/tilt/psi in degrees, ``shift`` (n, K, 2) in Angstrom
  in RELION's origin convention (``_rlnOriginXAngst``/``YAngst``), ``loglik``
  (n, K) and ``pose_peak`` (n, K).
- Classes are 1-based in every file a user sees (``_rlnClassNumber``,
  ``class_001/``), 0-based in arrays.
- Maps are (z, y, x) float32 volumes; the refinement pixel size (Angstrom) goes
  into every MRC header.

The full class posterior is kept in ``particles_all.star`` as columns
``_hrClassPosterior_001`` .. ``_hrClassPosterior_K``. RELION 3.1 accepts
unknown labels when they start with an underscore: it prints "will ignore (but
maintain) values for the unknown label" and keeps them through
``relion_star_handler`` (checked with RELION 3.1.3; see
``tests/test_relion_interop.py``).
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from hetrefine.classification import (
    calibrated_posteriors,
    fit_score_flags,
    half_b_order,
    hard_classes,
    relabel_half_b,
)
from hetrefine.fourier import fourier_resize
from hetrefine.fsc import fsc_crossing
from hetrefine.io import run_files
from hetrefine.io.atomic import atomic_path, write_text
from hetrefine.io.mrc import write_mrc
from hetrefine.junk import centred_assignments
from hetrefine.orientations import angdist_bild

#: Per-particle fit score column (``classification.fit_score``) and the flag of
#: particles below ``junk_fit_score`` (1 = flagged as junk, left out of the classes).
FIT_SCORE_COLUMN = "hrFitScore"
JUNK_FLAG_COLUMN = "hrJunkByFitScore"

#: Prefix of the per-class posterior columns in ``particles_all.star``.
POSTERIOR_PREFIX = "hrClassPosterior_"

#: Fixed timestamp for zip entries (the earliest a zip can hold), so a rerun is byte-identical.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


# --------------------------------------------------------------------------- assignments


def reported_assignments(
    paths: Sequence[str], n_particles: int, model: dict, self_evidence_corrected: bool = False
) -> dict:
    """The final assignments (row i = particle i) as every output reports them: the
    shards' assignments put together, half B's classes in the order the last
    reconstruct matched them to half A's, each class's fit scores about its own median
    (``junk.centred_assignments``) and the posteriors calibrated
    (``classification.calibrated_posteriors``), unless the engine already took the
    self-evidence out (config ``self_evidence_correction``: ``self_evidence_corrected``)."""
    a = relabel_half_b(run_files.assemble_assignments(paths, n_particles), half_b_order(model))
    a = centred_assignments(a, model)
    if not self_evidence_corrected:
        a["posterior"] = calibrated_posteriors(a["posterior"])
    return a


def particles_with_classes(table: pd.DataFrame, assign: dict) -> pd.DataFrame:
    """The particle table with each particle's class, best pose for that class and posteriors.

    ``table``: canonical table (N rows); ``assign``: arrays from
    :func:`hetrefine.io.run_files.assemble_assignments` (row i = particle i). Returns a new DataFrame,
    same row order, every input column kept except the internal ``hr_*``
    columns and the legacy pixel origins ``rlnOriginX``/``rlnOriginY`` (replaced
    by the Angstrom origins), plus (overwritten where already present):

    - ``rlnClassNumber`` (1-based argmax of the posterior),
    - ``rlnAngleRot``/``rlnAngleTilt``/``rlnAnglePsi`` (degrees, that class's best pose),
    - ``rlnOriginXAngst``/``rlnOriginYAngst`` (Angstrom, that class's best shift;
      in Angstrom so they hold at the input pixel size too),
    - ``rlnMaxValueProbDistribution`` (the largest class posterior),
    - ``rlnLogLikeliContribution`` (log-likelihood of the chosen class),
    - ``rlnRandomSubset`` (half-set + 1),
    - ``hrIntensityScale`` (with ``per_particle_scale``: the particle's intensity relative
      to its class's map, at the chosen class; ~1 for a typical particle),
    - ``hrFitScore`` (when the assignments hold ``fit_score``: the particle's fit to
      its class relative to what the noise model expects, ~N(0, 1) for a particle the
      class explains, negative for junk; ``classification.fit_score``),
    - ``hrClassPosterior_001`` .. (the full class posterior, K columns).
    """
    n = len(table)
    post = np.asarray(assign["posterior"], dtype=np.float64)
    if post.ndim != 2 or post.shape[0] != n:
        raise ValueError(f"posterior has shape {post.shape}, table has {n} rows")
    k = post.shape[1]
    cls = hard_classes(assign["posterior"])
    rows = np.arange(n)
    euler = np.asarray(assign["euler"], dtype=np.float64)[rows, cls]  # (N, 3)
    shift = np.asarray(assign["shift"], dtype=np.float64)[rows, cls]  # (N, 2)
    loglik = np.asarray(assign["loglik"], dtype=np.float64)[rows, cls]
    drop = [c for c in table.columns if str(c).startswith("hr_")]
    drop += [c for c in ("rlnOriginX", "rlnOriginY") if c in table.columns]
    drop += [c for c in table.columns if str(c).startswith(POSTERIOR_PREFIX)]
    df = table.drop(columns=drop).reset_index(drop=True).copy()
    new = {
        "rlnClassNumber": (cls + 1).astype(np.int64),
        "rlnAngleRot": euler[:, 0],
        "rlnAngleTilt": euler[:, 1],
        "rlnAnglePsi": euler[:, 2],
        "rlnOriginXAngst": shift[:, 0],
        "rlnOriginYAngst": shift[:, 1],
        "rlnMaxValueProbDistribution": post.max(axis=1),
        "rlnLogLikeliContribution": loglik,
        "rlnRandomSubset": np.asarray(assign["half"]).astype(np.int64) + 1,
    }
    if "scale" in assign:  # per_particle_scale: the intensity scale at the chosen class
        new["hrIntensityScale"] = np.asarray(assign["scale"], dtype=np.float64)[rows, cls]
    if "fit_score" in assign:
        new[FIT_SCORE_COLUMN] = np.asarray(assign["fit_score"], dtype=np.float64)
    for j in range(k):
        new[f"{POSTERIOR_PREFIX}{j + 1:03d}"] = post[:, j]
    for name, values in new.items():
        df[name] = values  # overwrites in place (keeps column position) or appends
    return df


# --------------------------------------------------------------------------- FSC


def shell_resolution(n_shells: int, box: int, pixel_size: float) -> np.ndarray:
    """Resolution in Angstrom of Fourier shells 0..n_shells-1 of a ``box`` map: box*px/s (inf at 0)."""
    s = np.arange(n_shells, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(s > 0, box * pixel_size / np.maximum(s, 1e-300), np.inf)


def _fsc_csv(fsc: np.ndarray, box: int, pixel_size: float) -> str:
    res = shell_resolution(len(fsc), box, pixel_size)
    lines = ["shell,resolution_A,fsc"]
    for s, (r, v) in enumerate(zip(res, np.asarray(fsc, dtype=np.float64), strict=True)):
        lines.append(f"{s},{'inf' if not np.isfinite(r) else f'{r:.4f}'},{v:.6f}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- STAR


def _write_star(path: Path, df: pd.DataFrame, optics_source: pd.DataFrame) -> None:
    """RELION 3.1 STAR via ``hetrefine.io.star.write_particles_star``; empty tables by hand.

    ``write_particles_star`` refuses a table with no rows, but a class can end
    up empty and the workflow still expects its ``particles.star``: for that
    case the optics block is taken from ``optics_source`` and the particle loop
    has its labels and no rows (RELION reads such a file as 0 particles).
    """
    from hetrefine.io.star import split_optics, write_particles_star

    if len(df):
        write_particles_star(path, df)
        return
    optics, _ = split_optics(optics_source, path)
    _, parts = split_optics(df, path)  # no rows: only the particle-block columns matter
    cols = list(parts.columns)
    out = ["", "# version 30001", "", "data_optics", "", "loop_"]
    out += [f"_{c} #{i + 1}" for i, c in enumerate(optics.columns)]
    for _, row in optics.iterrows():
        out.append(" ".join(_fmt(v) for v in row.tolist()))
    out += ["", "", "# version 30001", "", "data_particles", "", "loop_"]
    out += [f"_{c} #{i + 1}" for i, c in enumerate(cols)]
    write_text(path, "\n".join(out) + "\n\n")


def _fmt(v: object) -> str:
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.6f}"
    s = str(v)
    return s if s and not any(ch.isspace() for ch in s) else f'"{s}"'


# --------------------------------------------------------------------------- zip


def write_deterministic_zip(path: str | os.PathLike, members: dict[str, bytes]) -> None:
    """Write a zip of ``members`` (name -> bytes), byte-identical for identical input.

    Entries are sorted by name, dated 1980-01-01 00:00:00, stored without
    compression (MRC maps compress poorly and storing keeps the bytes
    independent of the zlib version), with fixed permissions 0644. Atomic.
    """
    with atomic_path(path, suffix=".zip") as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            for name in sorted(members):
                info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
                info.compress_type = zipfile.ZIP_STORED
                info.external_attr = 0o100644 << 16
                info.create_system = 3  # unix, so the permissions above are honoured
                zf.writestr(info, members[name])


# --------------------------------------------------------------------------- everything


def class_dir(out_dir: str | os.PathLike, k: int) -> Path:
    """Folder of 0-based class ``k``: ``out_dir/class_{k+1:03d}``."""
    return Path(out_dir) / f"class_{k + 1:03d}"


def write_final_outputs(
    table: pd.DataFrame,
    assign: dict,
    refs_maps: np.ndarray,
    hard_maps: np.ndarray | None,
    mask: np.ndarray,
    fsc: Sequence[np.ndarray],
    pixel_size: float,
    out_dir: str | os.PathLike,
    full_box: tuple[int, float] | None = None,
    particle_radius_A: float | None = None,
    junk_fit_score: float | None = None,
) -> dict[str, list[Path]]:
    """Write every final output of a run under ``out_dir``.

    Parameters
    ----------
    table : canonical particle table (N rows).
    assign : arrays from :func:`hetrefine.io.run_files.assemble_assignments` (row i = particle i).
    refs_maps : float32 (K, 2, D, D, D), the last iteration's half-maps A and B per class.
    hard_maps : float32 (K, D, D, D) reconstructed from hard-assigned particles only, or None.
    mask : float32 (D, D, D) soft mask used in refinement.
    fsc : K arrays, the half-map FSC per Fourier shell 0..D/2.
    pixel_size : refinement pixel size in Angstrom (written into every MRC header).
    out_dir : destination folder (created).
    full_box : (box, pixel size) of the particles when the refinement box is smaller:
        each class's map and half-maps also Fourier-padded back to it
        (``map_full_box.mrc``, ``map_half_A_full_box.mrc``, ``map_half_B_full_box.mrc``),
        ready as the reference of a RELION Refine3D or CryoSPARC refinement.
    particle_radius_A : radius of the orientation sphere in ``angdist.bild`` (default:
        0.375 of the box).
    junk_fit_score : particles whose fit score (``assign["fit_score"]``) is below it are
        flagged as junk: ``hrJunkByFitScore`` 1 in ``particles_all``, left out of every
        class's particle files (None: nothing flagged, no flag column).

    Files written (all atomically):

    - ``particles_all.star``: :func:`particles_with_classes` as RELION 3.1 STAR;
    - ``class_XXX/particles.star``: the rows hard-assigned to the class (the
      class STARs partition the particles not flagged as junk);
    - ``class_XXX/map.mrc``: the unmasked full map, mean of the half-maps
      (unmasked so users can choose their own mask; ``mask.mrc`` is beside it);
    - ``class_XXX/mask.mrc``: the refinement mask, in every class folder so each
      folder is complete on its own (``out_dir/mask.mrc`` is left alone: in the
      workflow that path is the mask rule's output);
    - ``class_XXX/map_half_A.mrc``, ``map_half_B.mrc``, ``map_hard.mrc`` (if given);
    - ``class_XXX/fsc.csv`` (``shell,resolution_A,fsc``) and
      ``class_XXX/resolution.json`` (0.143 and 0.5 crossings, particle count,
      class fraction);
    - ``volumes_all.zip``: ``class_XXX.mrc`` for every class (the full maps),
      byte-identical on a rerun;
    - ``particles_all.cs`` and ``class_XXX/particles.cs``: the same for CryoSPARC
      (when the table has the stack paths), see :func:`write_cs`.

    Returns the written paths: ``{"all": [...], "class_001": [...], ...}``.
    """
    out_dir = Path(out_dir)
    refs_maps = np.asarray(refs_maps)
    if refs_maps.ndim != 5 or refs_maps.shape[1] != 2:
        raise ValueError(f"refs_maps must be (K, 2, D, D, D), got {refs_maps.shape}")
    n_classes, box = refs_maps.shape[0], refs_maps.shape[-1]
    post = np.asarray(assign["posterior"])
    if post.shape != (len(table), n_classes):
        raise ValueError(f"posterior has shape {post.shape}, expected ({len(table)}, {n_classes})")
    if hard_maps is not None and np.shape(hard_maps) != (n_classes, box, box, box):
        raise ValueError(
            f"hard_maps must be (K, D, D, D) = {(n_classes, box, box, box)}, got {np.shape(hard_maps)}"
        )
    if len(fsc) != n_classes:
        raise ValueError(f"need one FSC per class ({n_classes}), got {len(fsc)}")

    written: dict[str, list[Path]] = {"all": []}
    df = particles_with_classes(table, assign)
    junk = np.zeros(len(table), bool)
    if junk_fit_score is not None:
        if "fit_score" not in assign:
            raise ValueError("junk_fit_score is set but the assignments hold no fit_score")
        junk = fit_score_flags(assign["fit_score"], junk_fit_score)
        df[JUNK_FLAG_COLUMN] = junk.astype(np.int64)
    if {"hr_stack", "hr_index"} <= set(table.columns):
        # absolute image names: the STAR files open from any folder (RELION resolves
        # relative names against the folder it runs in, which need not be the input's);
        # the names as given stay in RELION's rlnImageOriginalName
        if "rlnImageOriginalName" not in df.columns:
            df.insert(
                df.columns.get_loc("rlnImageName") + 1, "rlnImageOriginalName", df["rlnImageName"]
            )
        df["rlnImageName"] = [
            f"{int(i) + 1:06d}@{stack}"
            for i, stack in zip(table["hr_index"], table["hr_stack"], strict=True)
        ]
    p = out_dir / "particles_all.star"
    _write_star(p, df, table)
    written["all"].append(p)

    cls = df["rlnClassNumber"].to_numpy() - 1
    zip_members: dict[str, bytes] = {}
    for k in range(n_classes):
        cdir = class_dir(out_dir, k)
        files: list[Path] = []
        sel = (cls == k) & ~junk
        p = cdir / "particles.star"
        _write_star(p, df.loc[sel].reset_index(drop=True), table)
        files.append(p)
        half_a = refs_maps[k, 0].astype(np.float32)
        half_b = refs_maps[k, 1].astype(np.float32)
        full = (0.5 * (half_a.astype(np.float64) + half_b)).astype(np.float32)
        for name, vol in (
            ("map.mrc", full),
            ("map_half_A.mrc", half_a),
            ("map_half_B.mrc", half_b),
        ):
            write_mrc(cdir / name, vol, pixel_size)
            files.append(cdir / name)
        if full_box is not None:
            for name, vol in (("map", full), ("map_half_A", half_a), ("map_half_B", half_b)):
                write_mrc(
                    cdir / f"{name}_full_box.mrc",
                    fourier_resize(vol, full_box[0], ndim=3),
                    full_box[1],
                )
                files.append(cdir / f"{name}_full_box.mrc")
        write_mrc(cdir / "mask.mrc", mask, pixel_size)
        files.append(cdir / "mask.mrc")
        if hard_maps is not None:
            write_mrc(cdir / "map_hard.mrc", hard_maps[k], pixel_size)
            files.append(cdir / "map_hard.mrc")
        f_k = np.asarray(fsc[k], dtype=np.float64)
        write_text(cdir / "fsc.csv", _fsc_csv(f_k, box, pixel_size))
        files.append(cdir / "fsc.csv")
        info = {
            "class": k + 1,
            "resolution_0143_A": _json_float(fsc_crossing(f_k, box, pixel_size, 0.143)),
            "resolution_05_A": _json_float(fsc_crossing(f_k, box, pixel_size, 0.5)),
            "n_particles_hard": int(sel.sum()),
            "n_flagged_junk": int(((cls == k) & junk).sum()),
            "class_fraction_soft": float(post[:, k].sum() / max(len(table), 1)),
            "pixel_size_A": float(pixel_size),
            "box": int(box),
        }
        write_text(cdir / "resolution.json", json.dumps(info, indent=2) + "\n")
        files.append(cdir / "resolution.json")
        radius = particle_radius_A or 0.375 * box * pixel_size
        angles = df.loc[sel, ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
        write_text(cdir / "angdist.bild", angdist_bild(angles, box, pixel_size, radius))
        files.append(cdir / "angdist.bild")
        zip_members[f"class_{k + 1:03d}.mrc"] = (cdir / "map.mrc").read_bytes()
        written[f"class_{k + 1:03d}"] = files

    p = out_dir / "volumes_all.zip"
    write_deterministic_zip(p, zip_members)
    written["all"].append(p)
    if "hr_stack" in table.columns or "blob/path" in table.columns:
        dirs = [class_dir(out_dir, k) for k in range(n_classes)]
        cs_paths = write_cs(out_dir / "particles_all.cs", table, df, assign, dirs, ~junk)
        written["all"].append(cs_paths[0])
        for k, p in enumerate(cs_paths[1:]):
            written[f"class_{k + 1:03d}"].append(p)
    return written


def write_cs(
    path: str | os.PathLike,
    table: pd.DataFrame,
    df: pd.DataFrame,
    assign: dict,
    class_dirs: Sequence[str | os.PathLike] = (),
    keep: np.ndarray | None = None,
) -> list[Path]:
    """``particles_all.cs`` for CryoSPARC and, per class k, ``class_dirs[k]/particles.cs``
    (the particles hard-assigned to class k, the same rows and uids). Returns the paths.

    From a ``.cs`` input every input field and ``uid`` is kept as it was (the input's
    own ``alignments3D``/``alignments_class_k`` groups, if any, are replaced); from a
    STAR input the blob/ctf fields are built from its columns (``blob/path`` as the
    STAR file names the stack: CryoSPARC resolves it against its project folder) with
    uids 0..N-1. Added: CryoSPARC's heterogeneous-refinement fields
    (:func:`hetrefine.io.cs.hetero_refine_fields`): ``alignments3D/*`` for the chosen
    class and ``alignments_class_k/*`` (pose, shift, psize_A, class_posterior, ...)."""
    from hetrefine.io.cs import hetero_refine_fields, particles_cs_array, save_cs

    full = df.copy()
    if "hr_stack" in table.columns:
        # the stack path as the STAR file names it (relative paths stay relative, so
        # the file is the same wherever the run folder is)
        stack = table["rlnImageName"].astype(str).str.split("@", n=1).str[1]
        full["hr_stack"] = stack.to_numpy()
        full["hr_index"] = table["hr_index"].to_numpy()
    psize = table["rlnImagePixelSize"].to_numpy(dtype=np.float64)
    fields = hetero_refine_fields(assign, psize)
    if "fit_score" in assign:
        fields["hetrefine/fit_score"] = np.asarray(assign["fit_score"], dtype=np.float32)
    arr = particles_cs_array(full, fields)
    save_cs(path, arr)
    paths = [Path(path)]
    cls = arr["alignments3D/class"]
    keep = np.ones(len(arr), bool) if keep is None else np.asarray(keep, bool)
    for k, cdir in enumerate(class_dirs):
        save_cs(Path(cdir) / "particles.cs", arr[(cls == k) & keep])
        paths.append(Path(cdir) / "particles.cs")
    return paths


def _json_float(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def read_fsc_csv(path: str | os.PathLike) -> pd.DataFrame:
    """Read a ``fsc.csv`` written by :func:`write_final_outputs` (columns shell, resolution_A, fsc)."""
    return pd.read_csv(io.StringIO(Path(path).read_text()))
