"""Symmetrising maps and Fourier sums over a point group (``hetrefine.symmetry``'s matrices)."""

from __future__ import annotations

import functools

import numpy as np

from hetrefine.backend import get_xp

#
# Symmetrising sums a map read at g^T r for every group element g. The reads are a
# gather with interpolation weights written as plain array operations (floor, take,
# matmul) that numpy and CuPy both have, so the two give the same numbers; they match
# scipy.ndimage.map_coordinates(order=1 or 3, mode="constant") to float rounding (tested):
# a point outside [0, n - 1] on any axis reads 0 (a read on a face up to rounding
# counts as on it); a cubic spline reads the B-spline coefficients of the map with
# mirror boundaries (scipy's prefilter for this mode).
# All operators of the group are read in one pass per chunk of output points, every
# array given is read by the same gather, and what the group's exact grid symmetries
# make redundant is not computed:
# - trilinear reads: only voxels the input's non-zero voxels can reach (a ball);
# - the result is invariant under the group's signed permutations (e.g. I2's 2-folds on
#   x, y, z and 3-folds on the cube diagonals, all of O): one voxel per orbit is
#   computed, the others copied (and the Friedel half with ``hermitian``);
# - on an odd cube the input is first summed over the group's sign flips (exact), then
#   read at one operator per coset of them (I: 15 reads instead of 60).

#: Reads this close (voxels) outside a face count as on it (g^T r rounds; scipy would
#: give 0 or the face value depending on the last bit).
_ON_FACE = 1e-9
#: Elements (points x operators x taps) per chunk: bounds the memory of one gather.
_CHUNK = {"numpy": 1 << 19, "cupy": 1 << 24}


@functools.lru_cache(maxsize=16)
def _prefilter_matrix(n: int) -> np.ndarray:
    """(n, n) float64 matrix of the cubic B-spline prefilter along one axis with mirror
    boundaries: coefficients = M @ samples (scipy.ndimage.spline_filter1d's, exactly)."""
    import scipy.ndimage

    m = scipy.ndimage.spline_filter1d(np.eye(n), order=3, axis=0, mode="mirror")
    m.setflags(write=False)
    return m


def _spline_coefficients(vol):
    """Cubic B-spline coefficients (float64) of a real 3D array, mirror boundaries,
    padded by mirroring with 1 voxel before and 2 after on every axis (the taps a read
    in [0, n - 1] can touch). Three matrix products: the same on numpy and CuPy."""
    xp = get_xp(vol)
    c = vol.astype(xp.float64)
    for axis in range(3):
        m = xp.asarray(_prefilter_matrix(c.shape[axis]))
        c = xp.moveaxis(xp.tensordot(m, c, axes=([1], [axis])), 0, axis)
    return xp.pad(c, [(1, 2)] * 3, mode="reflect")


def _support_radius(arrays, origin: int) -> float:
    """Largest distance (voxels) from the voxel ``origin`` of any non-zero voxel of any
    of ``arrays`` (same shape (n0, n1, n2)); -1 when all are zero."""
    xp = get_xp(arrays[0])
    n0, n1, n2 = arrays[0].shape
    y2 = (xp.arange(n1, dtype=xp.float64) - origin) ** 2
    x2 = (xp.arange(n2, dtype=xp.float64) - origin) ** 2
    yx2 = y2[:, None] + x2[None, :]
    best = -1.0
    for z in range(n0):
        nz = arrays[0][z] != 0
        for a in arrays[1:]:
            nz |= a[z] != 0
        if bool(nz.any()):
            best = max(best, float(yx2[nz].max()) + (z - origin) ** 2)
    return float(np.sqrt(best)) if best >= 0 else -1.0


def _output_points(shape, origin: int, radius: float | None, half: bool, xp):
    """Flat indices (int64) of the voxels to compute: within ``radius`` of the origin
    (all when None), and when ``half`` one of every pair (k, -k) (the centre too)."""
    n0, n1, n2 = shape
    z = xp.arange(n0, dtype=xp.int64)[:, None, None] - origin
    y = xp.arange(n1, dtype=xp.int64)[None, :, None] - origin
    x = xp.arange(n2, dtype=xp.int64)[None, None, :] - origin
    keep = xp.ones(shape, dtype=bool)
    if radius is not None:
        keep &= (z * z + y * y + x * x).astype(xp.float64) <= radius * radius
    if half:
        keep &= (z > 0) | ((z == 0) & (y > 0)) | ((z == 0) & (y == 0) & (x >= 0))
    return xp.flatnonzero(keep)


def _taps(c, n: int, order: int, xp):
    """For reads at coordinates ``c`` along an axis of ``n`` voxels: the first tap's index
    (int64; in the array padded by 1 for order 3), the tap weights (..., order + 1) and
    the in-range mask (0 <= c <= n - 1; reads outside give 0)."""
    # a read on a face (c = 0 or n - 1 up to rounding of g^T r) is inside: snapped
    valid = (c >= -_ON_FACE) & (c <= n - 1 + _ON_FACE)
    c = xp.clip(c, 0, n - 1)
    if order == 1:
        i = xp.minimum(xp.floor(c), max(n - 2, 0))
        t = c - i
        return i.astype(xp.int64), xp.stack([1.0 - t, t], axis=-1), valid
    # cubic B-spline: taps floor(c) - 1 .. floor(c) + 2 = floor(c) .. + 3 when padded by 1
    i = xp.floor(c)
    t = c - i
    t2 = t * t
    t3 = t2 * t
    s = 1.0 - t
    w = xp.stack(
        [s * s * s, 3.0 * t3 - 6.0 * t2 + 4.0, -3.0 * t3 + 3.0 * t2 + 3.0 * t + 1.0, t3], axis=-1
    )
    return i.astype(xp.int64), w / 6.0, valid


def _group_sum(src, shape, mats, origin: int, order: int, points):
    """sum_g f(g^T r) at the voxels ``points`` (flat indices) of a grid of ``shape``.

    ``src``: (N, C) real columns read by the gather: the samples (order 1, N = n0 n1 n2)
    or the padded spline coefficients (order 3). Coordinates (x, y, z) of a voxel are its
    indices minus ``origin``; g^T r is read at index g^T r + origin. Returns (m, C).
    """
    xp = get_xp(src)
    n0, n1, n2 = shape
    g = xp.asarray(np.asarray(mats, dtype=np.float64))  # (G, 3, 3)
    n_ops = g.shape[0]
    taps = order + 1
    p0, p1, p2 = (n0, n1, n2) if order == 1 else (n0 + 3, n1 + 3, n2 + 3)
    d = xp.arange(taps, dtype=xp.int64)
    offsets = (d[:, None, None] * (p1 * p2) + d[None, :, None] * p2 + d[None, None, :]).reshape(
        -1
    )  # (taps**3,) in (dz, dy, dx) order
    out = xp.empty((points.shape[0], src.shape[1]), dtype=src.dtype)
    step = max(1, _CHUNK["numpy" if xp is np else "cupy"] // (n_ops * taps**3))
    for a in range(0, points.shape[0], step):
        flat = points[a : a + step]
        kz = (flat // (n1 * n2) - origin).astype(xp.float64)[:, None]
        ky = ((flat // n2) % n1 - origin).astype(xp.float64)[:, None]
        kx = (flat % n2 - origin).astype(xp.float64)[:, None]
        # (g^T r)_i = sum_j g_ji r_j for every operator at once: (m, G) per axis i
        q = [
            kx * g[None, :, 0, i] + ky * g[None, :, 1, i] + kz * g[None, :, 2, i] for i in range(3)
        ]
        ix, wx, vx = _taps(q[0] + origin, n2, order, xp)
        iy, wy, vy = _taps(q[1] + origin, n1, order, xp)
        iz, wz, vz = _taps(q[2] + origin, n0, order, xp)
        wz = wz * (vx & vy & vz)[..., None]
        w = wz[..., :, None, None] * wy[..., None, :, None] * wx[..., None, None, :]
        w = w.reshape(*w.shape[:2], -1).astype(src.dtype, copy=False)  # (m, G, taps**3)
        base = (iz * p1 + iy) * p2 + ix  # (m, G)
        vals = xp.take(src, base[..., None] + offsets, axis=0)  # (m, G, taps**3, C)
        m = vals.shape[0]
        out[a : a + step] = xp.matmul(w.reshape(m, 1, -1), vals.reshape(m, -1, src.shape[1]))[:, 0]
    return out


def _real_parts(arrays, xp):
    """The real arrays to read: each real array, or the real and imaginary parts."""
    parts = []
    for a in arrays:
        parts += [a.real, a.imag] if xp.iscomplexobj(a) else [a]
    return parts


def _grid_symmetries(mats) -> np.ndarray:
    """The elements of the group that map the grid onto itself: signed permutation
    matrices (int64 (h, 3, 3), identity first), e.g. the 2-folds on x, y and z of D2,
    I1 and I2, or all of O. ``out(h r) = out(r)`` holds for them exactly, so a
    symmetrised map need only be computed on one voxel of each of their orbits."""
    mats = np.asarray(mats, dtype=np.float64)
    rounded = np.round(mats)
    exact = np.abs(mats - rounded).max(axis=(1, 2)) < 1e-9
    perm = (np.abs(rounded).sum(axis=1) == 1).all(axis=1) & (np.abs(rounded).sum(axis=2) == 1).all(
        axis=1
    )
    return rounded[exact & perm].astype(np.int64)


def _image_flat(m, x, y, z, shape, origin: int):
    """Flat index of the voxel m k, k = (x, y, z) (int arrays, relative to ``origin``),
    for a signed permutation matrix ``m`` (host ints)."""
    _, n1, n2 = shape
    hx, hy, hz = (int(m[i, 0]) * x + int(m[i, 1]) * y + int(m[i, 2]) * z for i in range(3))
    return ((hz + origin) * n1 + (hy + origin)) * n2 + (hx + origin)


def _coset_representatives(mats, h: np.ndarray) -> np.ndarray:
    """One element c of every left coset c H of the grid symmetries H in the group."""
    mats = np.asarray(mats, dtype=np.float64)
    covered: set[tuple] = set()
    reps = []
    for g in mats:
        if tuple(np.round(g, 6).ravel() + 0.0) in covered:
            continue
        reps.append(g)
        for d in h:
            covered.add(tuple(np.round(g @ d, 6).ravel() + 0.0))
    return np.array(reps)


def _compose(a, m, xp):
    """The view b with b[k] = a[m k], for a signed permutation ``m`` (host ints) and
    ``a`` an odd cube centred at its middle voxel, indexed (z, y, x, ...) (coordinate i
    on axis 2 - i): flips and an axis transpose, no copy."""
    pi = [int(np.flatnonzero(m[i])[0]) for i in range(3)]  # (m k)_i = s_i k_pi(i)
    b = a
    for i in range(3):
        if m[i, pi[i]] < 0:  # k_i -> -k_i: a flip (odd cube, centred)
            b = xp.flip(b, axis=2 - i)
    inv = [pi.index(c) for c in range(3)]
    return xp.transpose(b, [2 - inv[2 - ax] for ax in range(3)] + list(range(3, a.ndim)))


def _split_signed_permutations(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """H = {p s}: its sign flips S (diagonal elements, a normal subgroup) and one p per
    coset p S. Sums and maxima over H then take |S| flips and |H/S| transposes."""
    flips = np.array([m for m in h if (np.abs(m) == np.eye(3, dtype=np.int64)).all()])
    covered: set[bytes] = set()
    reps = []
    for m in h:
        if m.tobytes() in covered:
            continue
        reps.append(m)
        covered.update((m @ f).tobytes() for f in flips)
    return flips, np.array(reps)


def _sum_over_flips(a, flips: np.ndarray):
    """F(k) = sum_{s in S} f(s k) over sign flips S of the group (diagonal elements,
    e.g. the 2-folds on x, y, z of D2, I1, I2, O), exactly, for ``a`` (n, n, n, ...) an
    odd centred cube (z, y, x, columns): each f(s .) is the cube flipped (s = s^T).
    Trilinear reads commute with flips, so sum_g f(g^T k) = sum_c F(c^T k) over one c
    per coset c S (:func:`_coset_representatives`): |S| times fewer reads. (Flips keep
    the memory order; the axis transposes of the other grid symmetries would not.)"""
    xp = get_xp(a)
    out = None
    for f in flips:
        v = _compose(a, f, xp)
        out = v.copy() if out is None else xp.add(out, v, out=out)
    return out


def _flip_representatives(n: int, flips: np.ndarray, hermitian: bool, xp):
    """For every voxel k of an odd cube of side n: the largest flat index of s k over the
    sign flips s (and -s k when ``hermitian``), flat int array (n**3,). Flips keep the
    memory order, so this is cheap; a voxel that is not its own flip representative is
    not the representative of its orbit under the whole group either."""
    size = n**3
    idx = xp.arange(size, dtype=xp.int32 if size < 2**31 else xp.int64).reshape(n, n, n)
    rep = idx.copy()
    for f in flips:
        v = _compose(idx, f, xp)
        xp.maximum(rep, v, out=rep)
        if hermitian:  # -s k sits at size - 1 - flat(s k)
            xp.maximum(rep, size - 1 - v, out=rep)
    return rep.reshape(-1)


def _orbit_plan(points, shape, origin: int, mats, hermitian: bool, xp):
    """Split the voxels ``points`` (flat) into those to compute and how to fill the rest.

    Returns ``(compute, fills)``: ``compute`` the flat indices to evaluate (one voxel of
    every orbit of the grid symmetries of :func:`_grid_symmetries`, with the inversion
    k -> -k when ``hermitian``; and every voxel outside the largest centred cube, whose
    images can leave the grid), and ``fills`` a list of ``(dest, src_pos, conj)``: the
    voxels ``dest`` take the computed value at positions ``src_pos`` of ``compute``,
    conjugated when ``conj``. The identity's fill (the computed voxels) comes last.
    """
    n0, n1, n2 = shape
    h = _grid_symmetries(mats)
    ops = [(m, False) for m in h]
    if hermitian:
        ops = [(-m, True) for m in h] + ops
    if len(ops) == 1:
        return points, []
    size = n0 * n1 * n2
    small = xp.int32 if size < 2**31 else xp.int64  # half the memory traffic
    pts = points.astype(small)
    kz = pts // (n1 * n2) - origin
    ky = (pts // n2) % n1 - origin
    kx = pts % n2 - origin
    half = min(origin, n0 - 1 - origin, n1 - 1 - origin, n2 - 1 - origin)
    inside = (xp.abs(kx) <= half) & (xp.abs(ky) <= half) & (xp.abs(kz) <= half)

    def image(m, x, y, z):
        return _image_flat(m, x, y, z, shape, origin)

    # one voxel of every orbit: the largest flat index in it; on an odd cube, first the
    # cheap test under the sign flips alone, then the whole group on what passes
    cand = xp.ones(pts.shape, dtype=bool)
    if len(set(shape)) == 1 and n0 % 2 == 1:
        flips, _ = _split_signed_permutations(h)
        cand = _flip_representatives(n0, flips, hermitian, xp)[points] == pts
    c_pts, c_in = pts[cand], inside[cand]
    cx, cy, cz = kx[cand], ky[cand], kz[cand]
    rep = c_pts.copy()
    for m in h:
        f = xp.where(c_in, image(m, cx, cy, cz), c_pts)
        rep = xp.maximum(rep, f)
        if hermitian:  # -h k sits at size - 1 - flat(h k) in an odd cube
            rep = xp.maximum(rep, size - 1 - f)
    keep = xp.zeros(pts.shape, dtype=bool)
    keep[xp.flatnonzero(cand)] = ~c_in | (rep == c_pts)
    keep |= ~inside
    compute = points[keep]
    sel = inside[keep]
    pos = xp.flatnonzero(sel)
    cx, cy, cz = (c[keep][sel].astype(xp.int64) for c in (kx, ky, kz))
    fills = [(image(m, cx, cy, cz), pos, conj) for m, conj in ops]
    # the computed voxels themselves last (conjugated images may land on them)
    fills.append((compute, xp.arange(compute.shape[0], dtype=xp.int64), False))
    return compute, fills


def _symmetrize_arrays(arrays, mats, order: int, scale: float, hermitian: bool):
    """``scale * sum_g a(g^T r)`` for each array of ``arrays`` (one cube shape), all read
    by the same gather; see the notes above. ``hermitian``: compute half of the voxels
    and give each ``-k`` the conjugate of ``k`` (odd cube, Friedel-symmetric inputs)."""
    xp = get_xp(arrays[0])
    shape = tuple(arrays[0].shape)
    origin = shape[0] // 2
    if hermitian and (len(set(shape)) != 1 or shape[0] % 2 == 0):
        raise ValueError(f"hermitian symmetrising needs an odd cube, got shape {shape}")
    parts = _real_parts(arrays, xp)
    wide = any(p.dtype.itemsize > 4 or p.dtype.kind in "iub" for p in parts)
    dtype = xp.float64 if wide else xp.float32
    flips, _ = _split_signed_permutations(_grid_symmetries(mats))
    fold = order == 1 and len(flips) > 1 and len(set(shape)) == 1 and shape[0] % 2 == 1
    read = _coset_representatives(mats, flips) if fold else np.asarray(mats, dtype=np.float64)
    if order == 1:
        r = _support_radius(parts, origin)
        src = xp.stack([p.astype(dtype, copy=False) for p in parts], axis=-1)  # (n, n, n, C)
        if fold:
            src = _sum_over_flips(src, flips)
        src = src.reshape(-1, len(parts))
        # a trilinear read reaches at most sqrt(3) voxels from a non-zero voxel
        radius = 0.0 if r < 0 else r + float(np.sqrt(3.0)) + 1e-6
    elif order == 3:
        src = xp.stack([_spline_coefficients(p).ravel() for p in parts], axis=1)
        radius = None  # spline coefficients have no compact support
    else:
        raise ValueError(f"order must be 1 or 3, got {order}")
    points = _output_points(shape, origin, radius, False, xp)
    compute, fills = _orbit_plan(points, shape, origin, mats, hermitian, xp)
    vals = _group_sum(src, shape, read, origin, order, compute)
    size = int(np.prod(shape))
    outs, c = [], 0
    for a in arrays:
        cplx = bool(xp.iscomplexobj(a))
        flat = xp.zeros(size, dtype=a.dtype if a.dtype.kind in "fc" else xp.float64)
        v = vals[:, c] * scale
        if cplx:
            v = v + 1j * (vals[:, c + 1] * scale)
        c += 2 if cplx else 1
        for dest, src_pos, conj in fills:
            flat[dest] = xp.conj(v[src_pos]) if (conj and cplx) else v[src_pos]
        if not fills:
            flat[compute] = v
        outs.append(flat.reshape(shape))
    return outs


def symmetrize_volume(vol, mats, order: int = 1):
    """Average of a real-space volume over a point group.

    ``vol``: (D, D, D) array indexed (z, y, x), numpy or cupy; rotations about the voxel
    ``D // 2`` on every axis. ``mats``: (n, 3, 3) group matrices (``symmetry_matrices``).
    ``order``: 1 (trilinear) or 3 (cubic B-spline), read as
    ``scipy.ndimage.map_coordinates(order=order, mode="constant")`` reads (the same
    numbers to float rounding, on numpy and CuPy alike). Returns
    ``out(r) = mean_g vol(g r)`` (same shape; zero where samples fall outside the box),
    so ``out(h r) = out(r)`` for every h in the group. For a group of order 1 the input
    is returned unchanged (a copy).
    """
    xp = get_xp(vol)
    mats = np.asarray(mats, dtype=np.float64)
    if len(mats) == 1 and np.allclose(mats[0], np.eye(3)):
        return vol.copy()
    # sum_g vol(g r) == sum_g vol(g^T r) over a group; the gather reads at g^T r
    (out,) = _symmetrize_arrays([vol], mats, order, 1.0 / len(mats), hermitian=False)
    return out.astype(vol.dtype if vol.dtype.kind == "f" else xp.float64, copy=False)


def _is_friedel_symmetric(grid) -> bool:
    """True when an odd cube holds ``grid(-k) = conj(grid(k))`` exactly (bit for bit),
    e.g. Friedel-complete sums; compared one slab at a time."""
    xp = get_xp(grid)
    n = grid.shape[0]
    if grid.ndim != 3 or len(set(grid.shape)) != 1 or n % 2 == 0:
        return False
    cplx = bool(xp.iscomplexobj(grid))
    for z in range(n // 2 + 1):
        mate = grid[n - 1 - z, ::-1, ::-1]
        if not bool(xp.all(grid[z] == (xp.conj(mate) if cplx else mate))):
            return False
    return True


def symmetrize_fourier(grid, mats, *, hermitian: bool | None = None):
    """Sum of a centred Fourier grid over a point group, trilinear interpolation.

    ``grid``: (P, P, P) real or complex array (numpy or cupy) indexed (kz, ky, kx), zero
    frequency at index ``P // 2`` on every axis (e.g. backprojection numerator or
    CTF^2 weight sums before the Wiener division). ``mats``: (n, 3, 3) group matrices.
    Returns ``out(k) = sum_g grid(g^T k)`` (a sum, not an average; zero outside the grid),
    the Fourier-space counterpart of ``symmetrize_volume`` up to the factor n: the
    numbers of ``scipy.ndimage.map_coordinates(order=1, mode="constant")`` summed over
    the group, to float rounding. Only the ball that the grid's non-zero voxels reach is
    computed. ``hermitian=True`` (odd P, ``grid(-k) = conj(grid(k))``, as for
    Friedel-complete sums) computes half of it and fills the rest by that symmetry;
    ``None`` (default) does so when the grid holds that symmetry exactly.
    """
    mats = np.asarray(mats, dtype=np.float64)
    if len(mats) == 1 and np.allclose(mats[0], np.eye(3)):
        return grid.copy()
    if hermitian is None:
        hermitian = _is_friedel_symmetric(grid)
    (out,) = _symmetrize_arrays([grid], mats, 1, 1.0, hermitian)
    return out


def symmetrize_fourier_sums(num, wgt, mats):
    """:func:`symmetrize_fourier` of a Friedel-complete pair of sums at once.

    ``num`` (P, P, P) complex with ``num(-k) = conj(num(k))`` and ``wgt`` (P, P, P) real
    with ``wgt(-k) = wgt(k)``, P odd (as ``projection.hermitian_unpack`` gives them). One
    gather reads both, and half of the ball is computed (``hermitian=True``). Returns
    ``(num, wgt)`` summed over the group; copies for C1."""
    mats = np.asarray(mats, dtype=np.float64)
    if len(mats) == 1 and np.allclose(mats[0], np.eye(3)):
        return num.copy(), wgt.copy()
    n_out, w_out = _symmetrize_arrays([num, wgt], mats, 1, 1.0, hermitian=True)
    return n_out, w_out
