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
