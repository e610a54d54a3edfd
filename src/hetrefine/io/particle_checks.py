"""Checks of particle metadata at read time, one row at a time: numbers where numbers
are expected, physical ranges of the CTF and pixel size (with the likely unit slip
named), the same image listed twice, non-finite values in any numeric column, one box
and pixel size per optics group; and the optics
corrections a file holds that the refinement does not apply (logged). Each refusal is one line naming the file, the row and the field."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from hetrefine.errors import InputError


def numeric_column(df: pd.DataFrame, col: str, path: Path) -> np.ndarray:
    """Column ``col`` as float64; refuses text and NaN, naming the first bad row."""
    raw = df[col]
    vals = pd.to_numeric(raw, errors="coerce")
    bad = vals.isna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        got = raw.iloc[row]
        what = "missing (NaN or a short row)" if pd.isna(got) else f"'{got}'"
        raise InputError(path, f"_{col} must be a number, got {what}", f"row {row + 1}, _{col}")
    arr = vals.to_numpy(dtype=np.float64)
    if not np.isfinite(arr).all():
        row = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise InputError(path, f"_{col} must be finite, got {arr[row]}", f"row {row + 1}, _{col}")
    return arr


#: Physical ranges checked at read time, per column: (low, high, unit, what is typical).
#: A microscopist's bounds: anything outside is a unit or sign mistake, not a microscope.
CTF_RANGES: dict[str, tuple[float, float, str, str]] = {
    "rlnVoltage": (60.0, 400.0, "kV", "typically 200 or 300"),
    "rlnSphericalAberration": (0.0, 10.0, "mm", "typically 2.7; 0 for a Cs-corrected microscope"),
    "rlnAmplitudeContrast": (0.0, 1.0, "", "a fraction, typically 0.07-0.1"),
    "rlnDefocusU": (100.0, 200000.0, "Angstrom", "underfocus is positive, typically 5000-40000"),
    "rlnDefocusV": (100.0, 200000.0, "Angstrom", "underfocus is positive, typically 5000-40000"),
}
#: Plausible pixel sizes (Angstrom per pixel).
PIXEL_RANGE_A = (0.05, 100.0)


def _unit_hint(col: str, v: float) -> str:
    """What a value out of range probably is (a unit or sign slip), or ''."""
    if col == "rlnVoltage" and v <= 0:
        return "; _rlnVoltage must be > 0 (kV)"
    if col == "rlnVoltage" and 60e3 <= v <= 400e3:
        return f"; {v:g} looks like volts: write {v / 1e3:g} (kV)"
    if col == "rlnSphericalAberration":
        if v < 0:
            return "; a negative Cs is not physical (0 for a Cs-corrected microscope)"
        if 100 <= v <= 10000:
            return f"; {v:g} looks like micrometres: write {v / 1e3:g} (mm)"
    if col == "rlnAmplitudeContrast" and 2 <= v <= 100:
        return f"; {v:g} looks like a percentage: write {v / 100:g}"
    if col.startswith("rlnDefocus"):
        if v < 0:
            return "; RELION's convention is underfocus positive (negate the defocus column)"
        if 0 < v < 100:
            return f"; {v:g} looks like micrometres: write {v * 1e4:g} (Angstrom)"
    return ""


def check_physical_ranges(df: pd.DataFrame, path: Path) -> None:
    """Refuse CTF values outside :data:`CTF_RANGES` (unit or sign mistakes), naming the
    first bad row, the field, the expected range and what the value probably is."""
    for col, (lo, hi, unit, typical) in CTF_RANGES.items():
        if col not in df.columns:
            continue
        v = df[col].to_numpy(dtype=np.float64)
        bad = ~((v >= lo) & (v <= hi))
        # defocus exactly 0 (with a 90 degree phase shift) is how simulators such as
        # cryoDRGN's write CTF-free images: kept
        zero_ok = col.startswith("rlnDefocus")
        if zero_ok:
            bad &= v != 0
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise InputError(
                path,
                f"_{col} is {v[row]:g}; expected {'0 or ' if zero_ok else ''}{lo:g}-{hi:g}"
                f"{' ' + unit if unit else ''} ({typical})" + _unit_hint(col, float(v[row])),
                f"row {row + 1}, _{col}",
            )


def refuse_duplicated_images(df: pd.DataFrame, path: Path) -> None:
    """Two rows naming the same image (same stack file, same index) are refused.

    A duplicated particle lands in both half-sets or twice in one, and inflates the FSC;
    dropping rows silently would break the row-for-row match of the outputs with the
    input. RELION's remedy is one command, given in the message.
    """
    dup = df.duplicated(subset=["hr_stack", "hr_index"], keep="first").to_numpy()
    if not dup.any():
        return
    row = int(np.flatnonzero(dup)[0])
    key = (df["hr_stack"].iloc[row], df["hr_index"].iloc[row])
    same = (df["hr_stack"] == key[0]).to_numpy() & (df["hr_index"] == key[1]).to_numpy()
    first = int(np.flatnonzero(same)[0])
    raise InputError(
        path,
        f"{int(dup.sum())} row(s) name an image already named by an earlier row; the first: "
        f"row {row + 1} repeats row {first + 1} (image {key[1] + 1} of {key[0]}). A particle "
        "used twice inflates the FSC: remove the repeated rows (in RELION: Subset selection, "
        "'Remove duplicates', i.e. relion_star_handler --remove_duplicates) and rerun",
        f"row {row + 1}",
    )


def check_all_numeric_finite(df: pd.DataFrame, path: Path) -> None:
    """NaN (e.g. from a short row) in any numeric input column is refused."""
    for col in df.columns:
        s = df[col]
        if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
            arr = s.to_numpy(dtype=np.float64, na_value=np.nan)
            if np.isnan(arr).any():
                row = int(np.flatnonzero(np.isnan(arr))[0])
                raise InputError(
                    path,
                    f"_{col} is missing or NaN (a short row, or a NaN value); "
                    "every row needs a number in every numeric column",
                    f"row {row + 1}, _{col}",
                )
        elif s.isna().any():
            row = int(np.flatnonzero(s.isna().to_numpy())[0])
            raise InputError(path, f"_{col} is missing (a short row?)", f"row {row + 1}, _{col}")


def refuse_mixed_within_group(df: pd.DataFrame, col: str, what: str, unit: str, path: Path) -> None:
    """Optics groups may differ in ``col`` (box, pixel size); the particles of one group
    may not (RELION keeps one value per group in ``data_optics``)."""
    values = df.groupby("rlnOpticsGroup", sort=True)[col].unique()
    for group, vals in values.items():
        vals = np.unique(np.round(np.asarray(vals, dtype=np.float64), 4))
        if len(vals) > 1:
            g = df["rlnOpticsGroup"].to_numpy()
            v = df[col].to_numpy(dtype=np.float64)
            row = int(np.flatnonzero((g == group) & (np.round(v, 4) != vals[0]))[0])
            raise InputError(
                path,
                f"particles of optics group {group} have different {what}s "
                f"({', '.join(f'{x:g}' for x in vals)} {unit}); expected one {what} per "
                "optics group (give each its own optics group)",
                f"row {row + 1}, _{col}",
            )


def _zernike_values(cell: object) -> np.ndarray:
    """A RELION Zernike cell (``[0.1,0.2,...]``, or a list after parsing) as floats."""
    if isinstance(cell, (list, tuple, np.ndarray)):
        return np.asarray(cell, dtype=np.float64)
    text = str(cell).strip().strip("[]")
    try:
        return np.asarray([float(t) for t in text.replace(",", " ").split()], np.float64)
    except ValueError:
        return np.zeros(0)


def unused_optics_notes(df: pd.DataFrame) -> list[str]:
    """One line per kind of optics correction the file holds (non-zero) that the refinement
    does not apply: beam tilt, odd and even Zernike aberrations, anisotropic magnification.
    They are carried to the output STAR files unchanged."""
    notes = []
    groups = df["rlnOpticsGroup"].to_numpy()
    tail = "carried to the output STAR files unchanged, not used in the refinement"

    def where(mask: np.ndarray) -> str:
        gs = np.unique(groups[mask])
        return f"optics group{'s' if len(gs) > 1 else ''} {', '.join(str(g) for g in gs)}"

    tilt = [c for c in ("rlnBeamTiltX", "rlnBeamTiltY") if c in df.columns]
    if tilt:
        t = np.abs(np.stack([pd.to_numeric(df[c], errors="coerce") for c in tilt], axis=1))
        t = np.nan_to_num(t)
        if (t > 0).any():
            notes.append(
                f"beam tilt (_rlnBeamTiltX/Y, up to {t.max():g} mrad, "
                f"{where((t > 0).any(axis=1))}): {tail}"
            )
    for col, kind in (("rlnOddZernike", "odd"), ("rlnEvenZernike", "even")):
        if col in df.columns:
            nz = np.array([np.any(_zernike_values(c) != 0) for c in df[col]], dtype=bool)
            if nz.any():
                notes.append(f"{kind} Zernike aberrations (_{col}, {where(nz)}): {tail}")
    mag = [f"rlnMagMat{i}{j}" for i in (0, 1) for j in (0, 1)]
    if all(c in df.columns for c in mag):
        m = np.stack([pd.to_numeric(df[c], errors="coerce") for c in mag], axis=1)
        off = np.abs(np.nan_to_num(m) - np.array([1.0, 0.0, 0.0, 1.0])).max(axis=1) > 1e-6
        if off.any():
            notes.append(f"anisotropic magnification (_rlnMagMat00..11, {where(off)}): {tail}")
    return notes
