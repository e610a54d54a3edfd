"""Point-group symmetry in RELION's conventions: group matrices and the asymmetric unit
(symmetrising maps and sums: :mod:`hetrefine.symmetrize`).

Groups (symbols are case-insensitive):

- ``C<n>`` (n >= 1): n-fold axis along z.
- ``D<n>`` (n >= 1): n-fold axis along z plus a 2-fold axis along x.
- ``T``: 3-fold axis along z, a 2-fold axis in the y-z plane at (0, sqrt(2/3), sqrt(1/3)).
- ``O``: 4-fold axes along x, y, z; 3-fold axes along the cube diagonals.
- ``I1``..``I4``: RELION's four icosahedral settings; ``I`` is ``I2`` (RELION's default):
  I1 has 2-folds on x, y, z and a 5-fold at (0.851, 0, 0.526) (Crowther's "no 222"
  orientation rotated as in RELION); I2 has 2-folds on x, y, z and a 5-fold at
  (0.526, 0, 0.851); I3 has a 5-fold on z and a 2-fold at (0.526, 0, -0.851);
  I4 has a 5-fold on z and a 2-fold at (0.526, 0, 0.851).

Every set was checked element by element (as a set) against the matrices printed by
RELION 3.1.3's ``relion_refine --sym X --print_symmetry_ops`` (see tests/test_symmetry.py).
RELION prints, for a rotation of +360/n degrees about the axis, the matrix of its inverse
(``R(2)`` of C4 is ``[[0, 1, 0], [-1, 0, 0], [0, 0, 1]]`` = Euler (0, 0, 90)); a group
is closed under inversion, so the sets agree whichever way they are read.

Matrices are ``(n, 3, 3)`` float64 rotation matrices acting on column vectors (x, y, z),
identity first. Volume arrays are indexed (z, y, x) with the origin at ``D // 2``.

Which side the group acts on poses: a pose ``A`` (docs: the image is the z-projection of
``V(A^T r)``; in Fourier space it samples the 3D transform at ``A^T (kx, ky, 0)``) and the
pose ``A @ g`` give identical images of a volume with ``V(g r) = V(r)`` for every g in
the group, because ``V((A g)^T r) = V(g^T A^T r) = V(A^T r)``. So the poses equivalent to
``A`` are the right cosets ``{A @ G_i}``; ``G_i @ A`` is in general a different view.
"""

from __future__ import annotations

import re

import numpy as np
from scipy.spatial.transform import Rotation

from hetrefine.backend import get_xp
from hetrefine.errors import InputError

_VALID = "C<n> or D<n> with n >= 1 (e.g. C1, C4, D7), T, O, I (= I2), I1, I2, I3, I4"

_A = 1.0 / np.sqrt(1.0 + ((1.0 + np.sqrt(5.0)) / 2.0) ** 2)  # 0.5257311
_B = (1.0 + np.sqrt(5.0)) / 2.0 * _A  # 0.8506508

# generators (order, axis) of the polyhedral groups in RELION's frames
_GENERATORS: dict[str, list[tuple[int, tuple[float, float, float]]]] = {
    "T": [(3, (0.0, 0.0, 1.0)), (2, (0.0, np.sqrt(2.0 / 3.0), np.sqrt(1.0 / 3.0)))],
    "O": [(4, (0.0, 0.0, 1.0)), (3, (1.0, 1.0, 1.0))],
    "I1": [(2, (0.0, 0.0, 1.0)), (5, (_B, 0.0, _A))],
    "I2": [(2, (0.0, 0.0, 1.0)), (5, (_A, 0.0, _B))],
    "I3": [(5, (0.0, 0.0, 1.0)), (2, (_A, 0.0, -_B))],
    "I4": [(5, (0.0, 0.0, 1.0)), (2, (_A, 0.0, _B))],
}


def _axis_rotation(order: int, axis: tuple[float, float, float]) -> np.ndarray:
    """Active rotation (3, 3) by +360/order degrees about ``axis``."""
    ax = np.asarray(axis, dtype=np.float64)
    ax = ax / np.linalg.norm(ax)
    return Rotation.from_rotvec(ax * 2.0 * np.pi / order).as_matrix()


def _closure(generators: list[np.ndarray], max_order: int = 120) -> np.ndarray:
    """All products of the generators (a finite group), identity first, in BFS order."""
    elems = [np.eye(3)]
    keys = {tuple(np.round(np.eye(3), 6).ravel())}
    frontier = [np.eye(3)]
    while frontier:
        new = []
        for a in frontier:
            for g in generators:
                m = g @ a
                k = tuple(np.round(m, 6).ravel() + 0.0)
                if k not in keys:
                    keys.add(k)
                    elems.append(m)
                    new.append(m)
        frontier = new
        if len(elems) > max_order:  # pragma: no cover - generators are fixed
            raise RuntimeError("symmetry generators do not close into a finite group")
    return np.array(elems)


def _bad_symbol(symbol: object) -> InputError:
    return InputError(
        "config", f"unknown point group {symbol!r}; expected {_VALID}", where="symmetry"
    )


def symmetry_matrices(symbol: str) -> np.ndarray:
    """Rotation matrices (n, 3, 3) of a point group in RELION's axis conventions.

    ``symbol``: ``C<n>``, ``D<n>`` (n >= 1), ``T``, ``O``, ``I``, ``I1``..``I4``,
    case-insensitive. Orders: n, 2n, 12, 24, 60. The identity comes first.
    Raises ``InputError`` (field ``symmetry``) for anything else.
    """
    if not isinstance(symbol, str):
        raise _bad_symbol(symbol)
    s = symbol.strip().upper()
    m = re.fullmatch(r"([CD])([0-9]+)", s)
    if m:
        n = int(m.group(2))
        if n < 1 or n > 1000:
            raise _bad_symbol(symbol)
        cn = Rotation.from_rotvec(
            np.outer(np.arange(n) * 2.0 * np.pi / n, [0.0, 0.0, 1.0])
        ).as_matrix()
        cn[0] = np.eye(3)
        if m.group(1) == "C":
            return cn
        flip = np.diag([1.0, -1.0, -1.0])  # 2-fold about x
        return np.concatenate([cn, flip @ cn])
    if s == "I":
        s = "I2"
    if s in _GENERATORS:
        gens = [_axis_rotation(o, ax) for o, ax in _GENERATORS[s]]
        mats = _closure(gens)
        mats[np.abs(mats) < 1e-12] = 0.0
        return mats
    raise _bad_symbol(symbol)


# fixed generic rotation: the asymmetric unit is the Voronoi cell of _CENTRE among {_CENTRE G_i}
_CENTRE = Rotation.from_euler("ZYZ", [23.7, 61.3, 137.9], degrees=True).as_matrix()


def asymmetric_unit_mask(rots, mats) -> np.ndarray:
    """Keep one pose per symmetry orbit: a bool mask (n,) over rotations ``rots`` (n, 3, 3).

    Under our projection convention the poses ``A @ G_i`` are equivalent (module
    docstring), so the orbit of ``A`` is the right coset ``{A @ G_i}``. A pose is kept
    iff it is the member of its orbit closest to a fixed generic rotation C, i.e.
    ``trace(C^T A) >= trace(C^T A G_i)`` for every i: the kept set is the Voronoi cell
    of C among ``{C G_i^T}``, a connected region holding 1/|G| of SO(3). Each orbit has
    exactly one kept member (ties have measure zero because C is generic). Works for
    numpy or cupy ``rots``; returns an array of the same module.
    """
    xp = get_xp(rots)
    r = xp.asarray(rots, dtype=xp.float64)
    g = xp.asarray(np.asarray(mats, dtype=np.float64))
    c = xp.asarray(_CENTRE)
    cr = xp.einsum("ji,njk->nik", c, r)  # C^T A, (n, 3, 3)
    # trace(C^T A G_i) = sum_jk (C^T A)_jk (G_i)_kj
    scores = xp.einsum("njk,ikj->ni", cr, g)
    return scores[:, 0] >= scores.max(axis=1) - 1e-12
