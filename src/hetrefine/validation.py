"""Checks of the particle set that need the whole table or the pixels, and the checks the
pre-flight and the run share (one function each, so they cannot disagree).

Metadata checks that need one row at a time (ranges, units, duplicated images) live in
:mod:`hetrefine.io.particles`, at read time. This module holds what the preprocess step
calls once the table is read:

- :func:`half_sets`: the gold-standard half-set of every particle, from
  ``_rlnRandomSubset`` when it is usable, else a seeded random split, with the reason
  as a warning when a given ``_rlnRandomSubset`` was not used;
- :func:`constant_images` and :func:`constant_images_error`: images whose pixels are all
  equal (e.g. all zero, from an extraction past the micrograph edge or a failed write),
  which carry no signal and which classification otherwise assigns with confidence;
- :func:`check_images`: every image read (NaN/Inf refused by the reader) and checked
  for constant ones, as preprocess does;
- :func:`check_mask_fits`, :func:`check_input_poses` (with :func:`particle_file_columns`
  and :func:`has_poses`), :func:`read_initial_model` and :func:`read_focus_mask`: config
  checks against the data.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from hetrefine.backend import get_xp
from hetrefine.errors import InputError

#: The smaller half-set must hold at least this fraction of the particles for a given
#: ``_rlnRandomSubset`` to be used (RELION's own halves are 50/50 up to selection noise).
MIN_HALF_FRACTION = 0.25


def _seeded_split(n: int, seed: int) -> np.ndarray:
    """Half-set 0/1 per particle from a seeded permutation: halves of sizes ceil/floor(n/2)."""
    rank = np.random.default_rng([int(seed), 1]).permutation(n)
    return (rank % 2).astype(np.int8)


def half_sets(table: pd.DataFrame, seed: int) -> tuple[np.ndarray, str | None]:
    """Half-set (0 = A, 1 = B) of every particle, int8 (n,), and a warning or None.

    Uses ``_rlnRandomSubset`` (1 -> A, 2 -> B) when the column is present, holds only 1
    and 2, and both halves hold at least :data:`MIN_HALF_FRACTION` of the particles.
    Otherwise (no column, a value other than 1/2, one half empty or too small, e.g. a
    STAR file selected from one half of a RELION refinement) the particles are split
    again by a seeded random permutation (``seed``; the same split as with no column),
    and the second value says why, for the log. Needs at least 2 particles.
    """
    n = len(table)
    if n < 2:
        raise InputError("particles", f"{n} particle(s): two half-sets need at least 2")
    if "rlnRandomSubset" not in table.columns:
        return _seeded_split(n, seed), None
    sub = pd.to_numeric(table["rlnRandomSubset"], errors="coerce").to_numpy(np.float64)
    other = ~np.isin(sub, (1.0, 2.0))
    if other.any():
        row = int(np.flatnonzero(other)[0])
        why = (
            f"_rlnRandomSubset is {table['rlnRandomSubset'].iloc[row]} at row {row + 1} "
            "(expected 1 or 2)"
        )
    else:
        n_b = int((sub == 2).sum())
        n_a = n - n_b
        if min(n_a, n_b) >= MIN_HALF_FRACTION * n:
            return (sub == 2).astype(np.int8), None
        why = (
            f"_rlnRandomSubset puts {n_a} particles in half 1 and {n_b} in half 2 "
            f"(each half needs at least {MIN_HALF_FRACTION:.0%})"
        )
    return _seeded_split(n, seed), (
        f"{why}; the particles were split again into two random half-sets (seed {seed}), "
        "so the half-maps and the FSC are still independent"
    )


def constant_images(images):
    """True for every image whose pixels are all equal (std 0, e.g. all zero) or not all
    finite: bool (m,) for images (m, ny, nx), numpy or cupy (the device follows the data).
    """
    xp = get_xp(images)
    flat = images.reshape(images.shape[0], -1)
    finite = xp.isfinite(flat).all(axis=1)
    flat_ = flat.max(axis=1) == flat.min(axis=1)
    return flat_ | ~finite


def constant_images_error(
    path: str | os.PathLike, table: pd.DataFrame, rows: np.ndarray
) -> InputError:
    """The error for blank images at table rows ``rows`` (0-based positions, sorted):
    how many, and the first few as ``row r (image i of stack)``; raise it."""
    rows = np.asarray(rows, dtype=np.int64)
    first = [
        f"row {r + 1} (image {int(table['hr_index'].iloc[r]) + 1} of "
        f"{os.path.basename(str(table['hr_stack'].iloc[r]))})"
        for r in rows[:3]
    ]
    return InputError(
        path,
        f"{len(rows)} of {len(table)} particle images are constant (every pixel equal, e.g. "
        f"all zero): {', '.join(first)}{', ...' if len(rows) > 3 else ''}; they carry no "
        "signal: remove those rows (e.g. relion_star_handler --discard_on_stats) and rerun",
        f"row {int(rows[0]) + 1}",
    )


def read_initial_model(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """An initial model as a usable cube and its voxel size (0 if unset): read through
    ``io.mrc.read_volume`` (which refuses what is not a 3D MRC map, or holds NaN/Inf),
    and refused when every voxel is equal (no structure to start from). The one check
    of an initial model, used by the workflow before any job runs, by init_references
    and by the pre-flight, so they cannot disagree."""
    from hetrefine.io.mrc import read_volume

    vol, px = read_volume(path)
    if float(vol.max()) == float(vol.min()):
        value = float(vol.flat[0])
        what = "empty (every voxel 0)" if value == 0 else f"constant (every voxel {value:g})"
        raise InputError(
            path,
            f"initial model is {what}: it holds no structure to start from; give a map from "
            "ab-initio or a low-passed model",
        )
    return vol, px


def read_focus_mask(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """The focused mask ``mask.file`` as a cube and its voxel size (0 if unset): read
    through ``io.mrc.read_volume`` (a missing or non-MRC file, NaN/Inf refused) and
    refused, in one line naming the file, when a value lies outside [0, 1] beyond
    rounding or every voxel is 0 (:func:`hetrefine.mask.mask_value_problem`). Used by
    the workflow before any job runs, by the mask step and by the pre-flight."""
    from hetrefine.io.mrc import read_volume
    from hetrefine.mask import mask_value_problem

    vol, px = read_volume(path)
    problem = mask_value_problem(vol)
    if problem:
        raise InputError(path, problem, "key 'mask.file'")
    return vol, px


#: A map spanning under 1/MODEL_EXTENT_REFUSE or over MODEL_EXTENT_REFUSE times the particle
#: box (in Angstrom) has a wrong header pixel size: refused. Outside 1/2 .. MODEL_EXTENT_WARN
#: times: a warning.
MODEL_EXTENT_REFUSE = 4.0
MODEL_EXTENT_WARN = 2.5


def check_model_extent(
    path: str | os.PathLike, n: int, voxel: float, box: int, pixel_size: float
) -> str | None:
    """Whether an initial model of ``n`` voxels of ``voxel`` A can hold the particles of
    ``box`` px at ``pixel_size`` A, judged by the Angstrom each spans: refused (one line,
    with the fix) when it is more than :data:`MODEL_EXTENT_REFUSE` times off, which is a wrong
    header pixel size (e.g. a map written with 1 A for 13.1 A particles, shrunk to a dot
    by the resampling); a warning to log (returned) when it is more than 2x smaller or
    :data:`MODEL_EXTENT_WARN` x larger; None when it fits. Called by init_references and the
    pre-flight, so they say the same."""
    extent, particles = n * voxel, box * pixel_size
    ratio = extent / particles
    if 1 / MODEL_EXTENT_REFUSE <= ratio <= MODEL_EXTENT_REFUSE and 0.5 <= ratio <= (
        MODEL_EXTENT_WARN
    ):
        return None
    what = (
        f"the map spans {extent:.4g} A ({n} px at {voxel:.4g} A/px in its header) but the "
        f"particle box spans {particles:.4g} A ({box} px at {pixel_size:.4g} A/px)"
    )
    fix = (
        f"if the map has the particles' pixel size, set it in the header (relion_image_handler "
        f"--i {os.path.basename(str(path))} --o fixed.mrc --force_header_angpix {pixel_size:.4g})"
    )
    if 1 / MODEL_EXTENT_REFUSE <= ratio <= MODEL_EXTENT_REFUSE:
        return f"{path}: {what}: is the header pixel size right? {fix}"
    raise InputError(
        path,
        f"{what}, {ratio:.3g} x: the header pixel size must be wrong (resampled, the map "
        f"would be {'a dot' if ratio < 1 else 'cut off'}); {fix}",
        "initial model pixel size",
    )


def check_initial_models(models, skip=()) -> None:
    """Read and check every initial model (:func:`read_initial_model`) except those in
    ``skip`` (the demo's, written by a job); raises the first problem."""
    skipped = {os.path.normpath(p) for p in skip}
    for path in models:
        if os.path.normpath(path) not in skipped:
            read_initial_model(path)


def check_images(path: str | os.PathLike, table: pd.DataFrame, chunk_size: int = 256) -> None:
    """Read every image of ``table`` and refuse what preprocess refuses, with its message:
    a NaN/Inf pixel (raised by :func:`hetrefine.io.stacks.iter_image_chunks`, naming the
    stack and the first such image in row order) and constant images
    (:func:`constant_images_error`, with their count). The pre-flight calls it so a bad
    image anywhere is found before the run, not only in a sample.

    A vectorised pass over the memory-mapped stacks (:func:`_images_look_usable`, about 4x
    faster) clears a good stack; only when it finds a problem are the images read again the
    way preprocess reads them, so the message is the run's own."""
    from hetrefine.io.stacks import iter_image_chunks

    try:
        if _images_look_usable(table, chunk_size):
            return
    except Exception:  # an unreadable stack: the reader below says what is wrong, as in the run
        pass
    blank = []
    for pos, chunk in iter_image_chunks(table, chunk_size):
        bad = constant_images(chunk)
        if bad.any():
            blank.append(pos[bad])
    if blank:
        raise constant_images_error(path, table, np.concatenate(blank))


def _images_look_usable(table: pd.DataFrame, chunk_size: int) -> bool:
    """True when every image of ``table`` is finite and not constant, from each stack's
    memory map, in file order, a chunk at a time: per image min and max (NaN propagates,
    an Inf is not finite, min == max is constant), without copies or float conversion."""
    import warnings

    import mrcfile

    index = table["hr_index"].to_numpy(np.int64)
    shapes = set()
    for stack, rows in table.groupby("hr_stack", sort=False).indices.items():
        idx = np.sort(index[rows])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mrc = mrcfile.mmap(stack, mode="r", permissive=True)
        with mrc:
            data = mrc.data[np.newaxis] if mrc.data.ndim == 2 else mrc.data
            shapes.add(data.shape[1:])
            for a in range(0, len(idx), chunk_size):
                sel = idx[a : a + chunk_size]
                contiguous = sel[-1] - sel[0] == len(sel) - 1
                block = data[sel[0] : sel[-1] + 1] if contiguous else data[sel]
                lo, hi = block.min(axis=(1, 2)), block.max(axis=(1, 2))
                if not (np.isfinite(lo).all() and np.isfinite(hi).all()) or (lo == hi).any():
                    return False
    return len(shapes) == 1


#: RELION's optics flags for images whose CTF was already applied: refined as if it were
#: not, every CTF would be applied twice.
CTF_APPLIED_FLAGS = {
    "rlnCtfDataAreCtfPremultiplied": "premultiplied by their CTF",
    "rlnCtfDataArePhaseFlipped": "phase-flipped",
}


def check_particles_for_run(
    path: str | os.PathLike, table: pd.DataFrame, pixel_size: float | None
) -> None:
    """What the run needs of a particle table beyond what the reader checks, said in one
    line: the config's ``pixel_size`` agrees with the file's (:func:`check_pixel_size_setting`),
    and no image had its CTF applied already (``_rlnCtfDataAreCtfPremultiplied`` or
    ``_rlnCtfDataArePhaseFlipped`` 1, e.g. from RELION 4's pseudo-subtomograms or a
    phase-flipping extraction), which the refinement would apply a second time. Called by
    preprocess and the pre-flight."""
    check_pixel_size_setting(path, table, pixel_size)
    for col, what in CTF_APPLIED_FLAGS.items():
        if col in table.columns:
            flag = pd.to_numeric(table[col], errors="coerce").fillna(0).to_numpy() != 0
            if flag.any():
                row = int(np.flatnonzero(flag)[0])
                group = (
                    f" (optics group {table['rlnOpticsGroup'].iloc[row]})"
                    if "rlnOpticsGroup" in table.columns
                    else ""
                )
                raise InputError(
                    path,
                    f"_{col} is 1{group}: these images are {what}, and the refinement applies the "
                    "CTF itself, so it would be applied twice; give images extracted without "
                    "CTF correction (RELION: Particle extraction without phase flipping or "
                    "CTF premultiplication)",
                    f"row {row + 1}, _{col}",
                )


def check_pixel_size_setting(
    path: str | os.PathLike, table: pd.DataFrame, pixel_size: float | None
) -> None:
    """The config's ``pixel_size`` is used only where the particle file gives none: when the
    file gives its own and the two differ (by more than 0.1 %), refused in one line, as
    ignoring the key would run at a pixel size the user did not choose, and applying it
    would silently overrule the file. Called by preprocess and the pre-flight."""
    if pixel_size is None:
        return
    file_px = table["rlnImagePixelSize"].to_numpy(np.float64)
    bad = np.abs(file_px - float(pixel_size)) > 1e-3 * float(pixel_size)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InputError(
            "config",
            f"pixel_size is {float(pixel_size):g} A but {os.path.basename(str(path))} gives "
            f"{file_px[row]:g} A per pixel (row {row + 1}); pixel_size is only used when the "
            "particle file has no pixel size: set pixel_size: null to use the file's, or "
            "correct the pixel size in the file",
            "pixel_size",
        )


def check_mask_fits(
    box: int,
    pixel_size: float,
    particle_diameter_A: float | None,
    inner_A: float | None,
    outer_A: float | None,
    enabled: bool = True,
) -> tuple[float, float]:
    """The mask's inner and outer diameters (Angstrom, :func:`hetrefine.mask.mask_diameters`)
    at the refinement box ``box`` of ``pixel_size`` A; :class:`InputError` naming the config
    key when the mask is enabled and either is wider than the box. Used by the mask step
    and the pre-flight."""
    from hetrefine.mask import mask_diameters

    inner, outer = mask_diameters(box, pixel_size, particle_diameter_A, inner_A, outer_A)
    width = box * pixel_size
    if enabled and max(inner, outer) > width * 1.0001:
        key = (
            ("mask.inner_diameter_A" if inner_A else "particle_diameter_A")
            if inner > width * 1.0001
            else "mask.outer_diameter_A"
        )
        raise InputError(
            "config",
            f"mask diameter {max(inner, outer):.1f} A is larger than the box "
            f"({box} px x {pixel_size:.3f} A = {width:.1f} A); use at most {width:.1f} A",
            key,
        )
    return inner, outer


#: RELION's pose columns; a CryoSPARC .cs file holds poses in ``alignments3D/pose``.
POSE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
CS_POSE_FIELD = "alignments3D/pose"


def has_poses(columns: Iterable[str]) -> bool:
    """True when particle columns (a STAR file's labels without ``_``, a .cs file's fields,
    or the canonical table's) hold poses: the three RELION angles, or ``alignments3D/pose``."""
    cols = set(columns)
    return all(c in cols for c in POSE_COLUMNS) or CS_POSE_FIELD in cols


def check_input_poses(input_poses: str, poses_present: bool) -> None:
    """:class:`InputError` when ``input_poses`` (fixed or local) needs poses that the
    particle file does not have. Called by the workflow at start, the pre-flight and
    the align step."""
    if str(input_poses) != "ignore" and not poses_present:
        raise InputError(
            "config",
            f"input_poses: {input_poses} needs poses in the particle file "
            "(_rlnAngleRot/_rlnAngleTilt/_rlnAnglePsi, or alignments3D/pose in a .cs) and it "
            "has none: set input_poses: ignore, or give a particle file with poses",
            "input_poses",
        )


def particle_file_columns(path: str | os.PathLike) -> list[str]:
    """The particles' column names, cheaply: a .cs file's fields from its header, or a STAR
    file's labels (without ``_``) of the loop holding ``_rlnImageName`` (``data_particles``
    preferred), read from the loop headers without parsing the rows."""
    path = Path(path)
    if path.suffix.lower() == ".cs":
        from hetrefine.io.cs import load_cs

        return list(load_cs(path, mmap=True).dtype.names)
    from hetrefine.io.particles import particle_loop

    return particle_loop(path)[0]


def check_online_em(
    iterations: int, online_iterations: int, batch_size_per_class: int, n_classes: int, n: int
) -> None:
    """Refuse a schedule whose last iteration is online EM on a batch smaller than the data
    set (``online_em_iterations`` >= ``iterations``, e.g. ``iterations: 2`` with the default
    3): the final outputs need every particle assigned, and only a full-EM iteration
    assigns them all (it failed in write_classes, after every iteration had run). A batch
    that covers every particle is fine. Called by the workflow at start and the pre-flight."""
    if iterations > online_iterations or n_classes * batch_size_per_class >= n:
        return
    raise InputError(
        "config",
        f"every one of the {iterations} iteration(s) is online EM (online_em_iterations: "
        f"{online_iterations}), on random batches of about {n_classes * batch_size_per_class} "
        f"of the {n} particles, so the last one would leave most particles without a class: "
        f"set online_em_iterations to at most {iterations - 1} (the last iteration must see "
        f"every particle), or iterations to at least {online_iterations + 1}",
        "online_em_iterations",
    )


def check_writable(folder: str | os.PathLike) -> None:
    """Refuse a run folder the run cannot write: the nearest existing folder on the way to
    ``folder``, and when ``folder`` exists every folder under it (permission bits, for
    this user). Snakemake would otherwise stop with a raw ``PermissionError`` traceback
    when it removes an old output before a job. Called by the workflow at start."""
    folder = Path(folder)
    here = folder
    while not here.exists() and here != here.parent:
        here = here.parent
    dirs = [here]
    if here == folder:
        dirs += sorted(d for d in folder.rglob("*") if d.is_dir())
    for d in dirs:
        if not os.access(d, os.W_OK | os.X_OK):
            raise InputError(
                d,
                f"folder is not writable by this user, and the run writes under {folder}: "
                f"make it writable (chmod -R u+w '{d}') or give the run another name (run: ...)",
            )


def check_config_files(paths: Iterable[str | os.PathLike]) -> None:
    """Refuse a key given twice in a config YAML file (at any level, e.g. ``symmetry: C2``
    added at the end of a file that already sets ``symmetry: C1``): YAML loaders keep the
    last value silently, so the run would not use what the user read first. One line
    naming the file, both lines and the key. Called by the workflow and the pre-flight on
    the config files they read; a file that is not valid YAML is left to their loaders."""
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.setdefault(key, line)
            except TypeError:  # an unhashable key: the loader itself refuses it
                continue
            if first != line:
                raise _DuplicateKey(key, first, line)
        return loader.construct_mapping(node, deep=deep)

    _Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    for path in paths:
        try:
            with open(path) as fh:
                yaml.load(fh, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
        except (OSError, yaml.YAMLError):
            continue
        except _DuplicateKey as dup:
            key, first, line = dup.args
            raise InputError(
                path,
                f"key {key!r} is given twice (first at line {first}); YAML keeps the last "
                "value without a word, so remove one of them",
                f"line {line}",
            ) from None


class _DuplicateKey(Exception):
    """(key, first line, second line) of a key given twice in one YAML mapping."""
