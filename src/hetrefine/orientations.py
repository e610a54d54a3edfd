"""Viewing directions of particle poses and their distribution on the sphere."""

from __future__ import annotations

import numpy as np

from hetrefine.rotations import euler_to_matrix


def viewing_directions(euler_deg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Viewing directions of RELION poses as (longitude, latitude) in radians.

    ``euler_deg`` (n, 3) rot, tilt, psi in degrees. The direction is the third
    row of the rotation matrix, (sin(tilt) cos(rot), sin(tilt) sin(rot), cos(tilt)),
    so longitude = rot in [-pi, pi) and latitude = 90 deg - tilt.
    """
    e = np.asarray(euler_deg, dtype=np.float64).reshape(-1, 3)
    if e.shape[0] == 0:
        return np.zeros(0), np.zeros(0)
    d = euler_to_matrix(e)[:, 2, :]
    lon = np.arctan2(d[:, 1], d[:, 0])
    lat = np.arcsin(np.clip(d[:, 2], -1.0, 1.0))
    return lon, lat


def orientation_histogram(
    euler_deg: np.ndarray, n_lon: int = 48, n_lat: int = 24
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts of viewing directions on an equal-area longitude x latitude grid.

    ``euler_deg`` (n, 3) RELION angles in degrees. Longitude bins are uniform
    in [-pi, pi]; latitude bins are uniform in sin(latitude) over [-1, 1], so
    every bin covers the same solid angle and counts compare directly.
    Returns ``counts`` int64 (n_lat, n_lon) summing to n, ``lon_edges``
    (n_lon + 1,) and ``lat_edges`` (n_lat + 1,) in radians.
    """
    lon, lat = viewing_directions(euler_deg)
    lon_edges = np.linspace(-np.pi, np.pi, n_lon + 1)
    lat_edges = np.arcsin(np.linspace(-1.0, 1.0, n_lat + 1))
    ilon = np.clip(((lon + np.pi) / (2 * np.pi) * n_lon).astype(np.int64), 0, n_lon - 1)
    ilat = np.clip(((np.sin(lat) + 1.0) / 2.0 * n_lat).astype(np.int64), 0, n_lat - 1)
    counts = np.zeros((n_lat, n_lon), dtype=np.int64)
    np.add.at(counts, (ilat, ilon), 1)
    return counts, lon_edges, lat_edges


def directions_bin_step(n_particles: int) -> float:
    """Angular size (degrees) of the direction bins for ``n_particles``: about 5
    particles per occupied bin on average, between 3 and 15 degrees."""
    n_bins = max(n_particles / 5.0, 1.0)
    return float(np.clip(np.rad2deg(np.sqrt(4 * np.pi / n_bins)), 3.0, 15.0))


def angdist_bild(euler_deg: np.ndarray, box: int, pixel_size: float, radius_A: float) -> str:
    """The viewing-direction distribution as a BILD file, as RELION's ``_angdist.bild``:
    one cylinder per direction bin, standing on a sphere of ``radius_A`` around the map's
    centre (box * pixel / 2 on each axis, in Angstrom, so it opens on the map in ChimeraX),
    pointing outwards along the direction, its length and colour (blue to red) growing
    with the bin's count. Bins: near-uniform directions at :func:`directions_bin_step`."""
    from hetrefine.sampling import sphere_directions

    e = np.asarray(euler_deg, dtype=np.float64).reshape(-1, 3)
    lines = []
    if len(e):
        step = directions_bin_step(len(e))
        centres = sphere_directions(step)
        views = euler_to_matrix(e)[:, 2, :]
        nearest = np.concatenate(
            [(views[i : i + 4096] @ centres.T).argmax(1) for i in range(0, len(views), 4096)]
        )
        counts = np.bincount(nearest, minlength=len(centres))
        top = counts.max()
        c = box * pixel_size / 2.0
        width = max(0.5 * radius_A * np.deg2rad(step), pixel_size)
        for d, n in zip(centres, counts, strict=True):
            if n == 0:
                continue
            f = n / top
            start = c + radius_A * d
            end = c + (radius_A + max(0.4 * radius_A * f, pixel_size)) * d
            lines.append(f".color {f:.3f} 0.000 {1 - f:.3f}")
            lines.append(
                ".cylinder " + " ".join(f"{v:.2f}" for v in (*start, *end)) + f" {width:.2f}"
            )
    return "\n".join(lines) + "\n"
