"""Optics groups with different pixel sizes and boxes on one refinement grid.

The refinement grid (decided once, from every optics group):

- the *reference group* is the group with the coarsest pixel size (ties: the larger
  box, then the lower group number), so that no group is asked for frequencies
  beyond its own Nyquist;
- the refinement box is ``refine_box`` (default: the reference group's box) and the
  refinement pixel size is the reference group's pixel size x its box / the
  refinement box, exactly as for a single group (Fourier cropping);
- every other group is resampled to that pixel size and box: its images are
  interpolated trigonometrically (the exact band-limited interpolant of the image,
  cut at the refinement Nyquist), about the image centre (pixel D//2), and cropped,
  or, where its field of view is smaller, extended periodically (its own background
  wraps in at the rim).

RELION (3.1+) instead keeps every group at its own grid and scales its frequencies
when projecting; it takes the reference grid from the first optics group. The maps
here come out on the reference group's grid, and the output STAR files keep every
group's own pixel size and box (origins are in Angstrom, so they hold for each).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

#: Pixel sizes closer than this (relative) count as equal.
PIXEL_RTOL = 1e-4


@dataclass(frozen=True)
class RefinementGrid:
    """The refinement box and pixel size, the reference group's own (input) grid, and
    per optics group (ascending group number) its box and pixel size."""

    box: int
    pixel_size: float
    input_box: int
    input_pixel_size: float
    groups: tuple[int, ...]
    group_boxes: tuple[int, ...]
    group_pixel_sizes: tuple[float, ...]

    def is_reference_grid(self, i: int) -> bool:
        """True when group ``i`` (position in ``groups``) is on the reference group's
        grid: it is Fourier-cropped as a single group is."""
        return self.group_boxes[i] == self.input_box and _same(
            self.group_pixel_sizes[i], self.input_pixel_size
        )


def _same(a: float, b: float) -> bool:
    return abs(a - b) <= PIXEL_RTOL * max(a, b)


def group_grids(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(groups, boxes, pixel sizes), one entry per optics group in ascending group order,
    from a canonical particle table (one box and pixel size per group, checked at read)."""
    first = table.groupby("rlnOpticsGroup", sort=True).first()
    return (
        first.index.to_numpy(dtype=np.int64),
        first["rlnImageSize"].to_numpy(dtype=np.int64),
        first["rlnImagePixelSize"].to_numpy(dtype=np.float64),
    )


def refinement_grid(table: pd.DataFrame, refine_box: int | None) -> RefinementGrid:
    """The refinement grid of a canonical table (see the module doc for the rule)."""
    groups, boxes, pix = group_grids(table)
    coarsest = pix.max()
    cand = np.flatnonzero(pix >= coarsest * (1 - PIXEL_RTOL))
    ref = int(cand[np.argmax(boxes[cand])])  # argmax keeps the first of equal boxes
    in_box, in_px = int(boxes[ref]), float(pix[ref])
    box = int(refine_box or in_box)
    return RefinementGrid(
        box=box,
        pixel_size=in_px * in_box / box,
        input_box=in_box,
        input_pixel_size=in_px,
        groups=tuple(int(g) for g in groups),
        group_boxes=tuple(int(b) for b in boxes),
        group_pixel_sizes=tuple(float(p) for p in pix),
    )


def group_positions(table: pd.DataFrame, grid: RefinementGrid) -> np.ndarray:
    """Each particle's optics group as a position 0..G-1 in ``grid.groups`` (int16, (n,))."""
    g = table["rlnOpticsGroup"].to_numpy(dtype=np.int64)
    return np.searchsorted(np.asarray(grid.groups), g).astype(np.int16)


def resampling_matrix(n_in: int, px_in: float, n_out: int, px_out: float) -> np.ndarray:
    """(n_out, n_in) float64 matrix M such that ``M @ img @ M.T`` resamples an image of
    ``n_in`` pixels of ``px_in`` Angstrom to ``n_out`` pixels of ``px_out``.

    Each row samples the image's trigonometric interpolant (the inverse DFT read at
    any position) at output pixel j, i.e. at (j - n_out//2) * px_out Angstrom from the
    centre pixel n_in//2, keeping only the frequencies below the output Nyquist
    1/(2 px_out) (and the input's: half weight on a frequency exactly at either
    Nyquist, so the result is real and Friedel-symmetric). With equal grids it is the
    identity; sampling outside the field of view wraps around (the DFT is periodic).
    """
    if px_out < px_in * (1 - PIXEL_RTOL):
        raise ValueError(f"resampling {px_in} A to the finer {px_out} A would upsample")
    kc = min(n_in / 2.0, n_in * px_in / (2.0 * px_out))  # band limit, cycles per field
    k = np.arange(0, int(np.floor(kc + 1e-9)) + 1, dtype=np.float64)
    w = np.where(k == 0, 1.0, 2.0)  # +k and -k together (cosines)
    w = np.where(np.abs(k - kc) < 1e-9, w / 2, w)  # a frequency at the cut: half weight
    u = (np.arange(n_out) - n_out // 2) * (px_out / px_in)  # input pixels from the centre
    d = u[:, None] - (np.arange(n_in) - n_in // 2)[None, :]  # (n_out, n_in)
    out = np.zeros((n_out, n_in))
    for kk, wk in zip(k, w, strict=True):  # one frequency at a time: memory n_out x n_in
        out += wk * np.cos((2 * np.pi * kk / n_in) * d)
    return out / n_in


def resample_images(images: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``images`` (m, n, n) float32 resampled with a :func:`resampling_matrix` (b, n):
    float32 (m, b, b)."""
    mat = matrix.astype(np.float32)
    return np.matmul(np.matmul(mat, images.astype(np.float32)), mat.T)
