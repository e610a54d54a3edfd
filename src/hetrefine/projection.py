"""Fourier-slice projection with trilinear interpolation, and its exact adjoint.

A reference volume is held as the centred Fourier transform of the volume
zero-padded by ``pad`` (default 2), pre-divided by the real-space transform of
the trilinear kernel (gridding correction). Its central slices equal the
unitary 2D FFTs (``fourier.rfft2_centered``) of the volume's projections:

    image_hat(kx, ky) = grid(pad * A^T (kx, ky, 0))

for a pose ``A`` (RELION's Euler matrix, see ``rotations``). Backprojection
scatters slice values into a grid with the same trilinear weights: it is the
adjoint of projection.

Grids are cubes of odd size ``n = 2 * half + 1`` with the zero frequency at
index ``half``; arrays indexed (z, y, x); coordinates (x, y, z).
"""

from __future__ import annotations

import functools
import weakref

import numpy as np

from hetrefine import kernels
from hetrefine.backend import get_fft, get_xp

PAD = 2
"""Fourier padding of every reference and sums grid in a run (2x oversampling)."""


def grid_half_size(box: int, pad: int, radius: float | None = None) -> int:
    """Half size of the Fourier grid holding frequencies up to ``radius`` (box pixels)."""
    if radius is None:
        radius = box / 2
    return int(np.ceil(pad * min(radius, box / 2))) + 2


def sinc2_profile(box: int, pad: int, xp=np):
    """Real-space transform of the trilinear kernel on a padded grid, (D,) per axis."""
    x = (xp.arange(box) - box // 2) / (pad * box)
    return xp.sinc(x) ** 2


def prepare_reference(volume, pad: int = 2, radius: float | None = None):
    """Real volume (D, D, D) -> padded, gridding-corrected Fourier grid (n, n, n) complex64.

    Only frequencies within ``radius`` (pixels of the box; default Nyquist) are kept,
    in a cube of half size ``grid_half_size(D, pad, radius)``.
    """
    xp = get_xp(volume)
    fft = get_fft(xp)
    box = volume.shape[0]
    size = pad * box
    s = sinc2_profile(box, pad, xp)
    corr = volume / (s[:, None, None] * s[None, :, None] * s[None, None, :])
    padded = xp.zeros((size, size, size), dtype=xp.float32)
    lo = size // 2 - box // 2
    padded[lo : lo + box, lo : lo + box, lo : lo + box] = corr
    full = xp.fft.fftshift(fft.fftn(xp.fft.ifftshift(padded))) / box
    half = grid_half_size(box, pad, radius)
    c = size // 2
    lo, hi = max(c - half, 0), min(c + half + 1, size)
    cube = xp.zeros((2 * half + 1,) * 3, dtype=xp.complex64)
    o = lo - (c - half)
    cube[o : o + hi - lo, o : o + hi - lo, o : o + hi - lo] = full[lo:hi, lo:hi, lo:hi]
    return cube


def slice_coordinates(rots, kx, ky, pad: int):
    """3D grid coordinates of 2D Fourier points for poses, axis first: (3, ..., m) as
    (x, y, z).

    rots: (..., 3, 3); kx, ky: (m,) in box pixels. Coordinate = pad * A^T (kx, ky, 0),
    i.e. kx times the first row of A plus ky times the second. Elementwise products,
    not a matrix product: a BLAS kernel would round a point differently with its
    place in the block, and the block with the batch.
    """
    xp = get_xp(rots)
    kxp = kx.astype(rots.dtype) * pad
    kyp = ky.astype(rots.dtype) * pad
    a0 = xp.moveaxis(rots[..., 0, :], -1, 0)[..., None]  # (3, ..., 1)
    a1 = xp.moveaxis(rots[..., 1, :], -1, 0)[..., None]
    return a0 * kxp + a1 * kyp


def _corners(coords, half: int):
    """Base flat index (N,) int32 of the lower corner and fractions (N,) fx, fy, fz
    on an odd grid, for coordinates (3, ...) from :func:`slice_coordinates`."""
    xp = get_xp(coords)
    n = 2 * half + 1
    g = coords.reshape(3, -1).astype(xp.float32, copy=False) + xp.float32(half)
    g0 = xp.floor(g)
    g -= g0  # fractions
    i0 = g0.astype(xp.int32)
    xp.clip(i0, 0, n - 2, out=i0)
    # int32 flat indices: half the memory traffic of int64 (grids stay below 2**31)
    base = i0[2] * (n * n)
    base += i0[1] * n
    base += i0[0]
    return base, g[0], g[1], g[2]


def _trilinear(coords, half: int):
    """Flat corner indices (8, N) and weights (8, N) for coordinates (3, ...) on an odd grid."""
    xp = get_xp(coords)
    n = 2 * half + 1
    base, fx, fy, fz = _corners(coords, half)
    idx = []
    w = []
    for dz in (0, 1):
        wz = fz if dz else 1 - fz
        for dy in (0, 1):
            wy = fy if dy else 1 - fy
            wzy = wz * wy
            for dx in (0, 1):
                wx = fx if dx else 1 - fx
                idx.append(base + ((dz * n + dy) * n + dx))
                w.append(wzy * wx)
    return xp.stack(idx), xp.stack(w)


# points per block of the CPU projection: the block's temporaries (a few complex
# arrays of this length) stay in cache, which more than halves the time per point
PROJECT_BLOCK_POINTS = 32768


def _lerp(lo, hi, t):
    """lo + t (hi - lo), computed in place into ``lo`` (``hi`` is overwritten)."""
    hi -= lo
    hi *= t
    lo += hi
    return lo


def _lerp_x(xp, flat, base, offset, ix, lo, hi, fx):
    """Gather the x-neighbours at ``base + offset`` and ``+ 1`` into ``lo``/``hi``
    and interpolate along x, into ``lo`` (``ix`` is a scratch index buffer)."""
    xp.add(base, offset, out=ix)
    xp.take(flat, ix, out=lo)
    xp.add(ix, 1, out=ix)
    xp.take(flat, ix, out=hi)
    return _lerp(lo, hi, fx)


def _points_times_pad(kx, ky, pad: int):
    """kx, ky (m,) as float32 times ``pad``, as :func:`slice_coordinates` rounds them."""
    kxp = np.ascontiguousarray(kx, dtype=np.float32) * np.float32(pad)
    return kxp, np.ascontiguousarray(ky, dtype=np.float32) * np.float32(pad)


def grid_as_float32(grid):
    """A complex64 grid (n, n, n) flattened to interleaved float32 (2 n**3,), as the
    compiled kernels read it (no copy when it is contiguous)."""
    return np.ascontiguousarray(grid).reshape(-1).view(np.float32)


# compact copies of reference grids for the compiled gathers, by id(grid): (a weak
# reference to the grid, the copy's half size, the copy as float32)
_COMPACT: dict[int, tuple] = {}


def _compact_grid(grid, kx, ky, pad: int):
    """(interleaved float32 values of the central cube of ``grid`` that holds the points
    (kx, ky), its size, the grid's half size) for the compiled gathers: at box 128 and
    limit 32 px 133^3 (19 MiB, rows contiguous: more gathers hit cache) of the 261^3
    cube the align step prepares. Made once per grid (grown for a wider radius),
    dropped with it: grids must not change in place after their first projection. The
    kernels compute coordinates on the whole grid: the same values."""
    half = grid.shape[0] // 2
    r2 = float((kx.astype(np.float64) ** 2 + ky.astype(np.float64) ** 2).max()) if len(kx) else 0.0
    need = int(np.ceil(pad * np.sqrt(r2))) + 2  # trilinear reach, as grid_half_size
    if need >= half - 1:
        return grid_as_float32(grid), grid.shape[0], half
    key, hit = id(grid), _COMPACT.get(id(grid))
    if hit is None or hit[0]() is not grid:
        weakref.finalize(grid, _COMPACT.pop, key, None)
    elif hit[1] >= need:
        return hit[2], 2 * hit[1] + 1, half
    lo, hi = half - need, half + need + 1
    gv = grid_as_float32(np.ascontiguousarray(grid[lo:hi, lo:hi, lo:hi]))
    _COMPACT[key] = (weakref.ref(grid), need, gv)
    return gv, 2 * need + 1, half


def project(grid, rots, kx, ky, pad: int = 2, kernel: str | None = None):
    """Central slices of a Fourier grid at 2D points (kx, ky) for poses.

    grid: (n, n, n) complex64 from :func:`prepare_reference`; rots (..., 3, 3);
    kx, ky (m,) in box pixels. Returns (..., m) complex64.

    On the CPU the compiled kernel (``kernels.project_kernel``) runs unless
    ``kernel="numpy"`` (or ``HETREFINE_KERNELS=numpy``) asks for the reference
    path: trilinear interpolation written as four x-lerps of gathered neighbours,
    then y- and z-lerps, in place in reused buffers, a block of rotations at a time
    on the CPU (the whole set at once on a GPU). Both give the same numbers.
    """
    xp = get_xp(grid)
    half = grid.shape[0] // 2
    n = 2 * half + 1
    nn = n * n
    lead = rots.shape[:-2]
    rots = rots.reshape(-1, 3, 3).astype(xp.float32)
    n_rot, m = rots.shape[0], kx.shape[0]
    out = xp.empty((n_rot, m), dtype=xp.complex64)
    if n_rot == 0 or m == 0:
        return out.reshape(*lead, m)
    if grid.dtype == np.complex64 and kernels.use_numba(xp, kernel):
        kxp, kyp = _points_times_pad(kx, ky, pad)
        gv, n_c, _ = _compact_grid(grid, kx, ky, pad)
        kernels.compiled().project_kernel(
            gv, n_c, half, np.ascontiguousarray(rots), kxp, kyp, out.view(np.float32)
        )
        return out.reshape(*lead, m)
    flat = grid.ravel()
    per = n_rot if xp is not np else max(1, PROJECT_BLOCK_POINTS // m)
    size = min(per, n_rot) * m
    bufs = [xp.empty(size, dtype=xp.complex64) for _ in range(5)]
    ix_buf = xp.empty(size, dtype=xp.int32)  # int32: half the index traffic (grids < 2**31)
    for r0 in range(0, n_rot, per):
        r1 = min(r0 + per, n_rot)
        npts = (r1 - r0) * m
        base, fx, fy, fz = _corners(slice_coordinates(rots[r0:r1], kx, ky, pad), half)
        b = [buf[:npts] for buf in bufs]
        ix = ix_buf[:npts]

        z0 = _lerp(
            _lerp_x(xp, flat, base, 0, ix, b[0], b[1], fx),
            _lerp_x(xp, flat, base, n, ix, b[2], b[3], fx),
            fy,
        )
        z1 = _lerp(
            _lerp_x(xp, flat, base, nn, ix, b[1], b[2], fx),
            _lerp_x(xp, flat, base, nn + n, ix, b[3], b[4], fx),
            fy,
        )
        out[r0:r1] = _lerp(z0, z1, fz).reshape(r1 - r0, m)
    return out.reshape(*lead, m)


def slice_scores(grid, rots, kx, ky, x, c2w, pad: int = 2, kernel: str | None = None, ph=None):
    """Inner products of particle transforms with the slices of a grid, and the
    slices' weighted norms: the local search's cross and norm terms.

    rots (b, C, P, 3, 3): P rotations for each of C candidates of b particles;
    x (b, C, S, m) complex64: S weighted, shifted transforms per candidate (or x
    (b, C, m) times ``ph`` (S, m): made a block at a time by the kernel); c2w (b, m)
    real (C^2 / sigma2). Returns cross (b, C, S, P) = sum_k Re(conj(x) a) and norm (b, C, P) = sum_k c2w |a|^2, float32, for the slice a of each
    rotation (:func:`project`). On the CPU a compiled kernel computes them without
    storing the slices (unless ``kernel="numpy"``); the reference path is a real
    batched matrix product over [Re, Im] (sums in another order: the two agree to
    float32 rounding).
    """
    xp = get_xp(grid)
    nb, n_c, n_p = rots.shape[:3]
    n_s, m = (x.shape[2] if ph is None else ph.shape[0]), kx.shape[0]
    if grid.dtype == np.complex64 and kernels.use_numba(xp, kernel):
        kxp, kyp = _points_times_pad(kx, ky, pad)
        cross = np.empty((nb, n_c, n_s, n_p), np.float32)
        norm = np.empty((nb, n_c, n_p), np.float32)
        gv, n_g, half = _compact_grid(grid, kx, ky, pad)
        parts = (x.real, x.imag) if ph is None else (x.real, x.imag, ph.real, ph.imag)
        run = kernels.compiled().local_scores_kernel
        run = run if ph is None else kernels.compiled().local_scores_shifted_kernel
        run(
            gv, n_g, half, np.ascontiguousarray(rots, dtype=np.float32), kxp, kyp,
            *[np.ascontiguousarray(v, np.float32) for v in parts],
            np.ascontiguousarray(c2w, dtype=np.float32), cross, norm,
        )  # fmt: skip
        return cross, norm
    if ph is not None:
        x = x[:, :, None, :] * ph[None, None]
    a = project(grid, rots.reshape(-1, 3, 3), kx, ky, pad, kernel).reshape(nb, n_c, n_p, m)
    x_ri = xp.concatenate([x.real, x.imag], axis=-1).reshape(nb * n_c, n_s, 2 * m)
    a_ri = xp.concatenate([a.real, a.imag], axis=-1).reshape(nb * n_c, n_p, 2 * m)
    cross = xp.matmul(x_ri, a_ri.transpose(0, 2, 1)).reshape(nb, n_c, n_s, n_p)
    # sum_k C^2/s2 |A|^2 as a batched matrix-vector product over [Re A, Im A]^2
    w2 = xp.concatenate([c2w, c2w], axis=1)  # (b, 2m)
    norm = xp.matmul((a_ri * a_ri).reshape(nb, n_c * n_p, 2 * m), w2[:, :, None])
    return cross, norm.reshape(nb, n_c, n_p)


def backproject(num, wgt, rots, kx, ky, values, weights, pad: int = 2) -> None:
    """Add slices into a numerator grid and a weight grid, in place (adjoint of project).

    num: (n, n, n) complex; wgt: (n, n, n) real; rots (b, 3, 3); kx, ky (m,);
    values (b, m) complex (e.g. CTF * image / sigma2); weights (b, m) real
    (e.g. CTF^2 / sigma2), or None to leave ``wgt`` untouched.
    """
    xp = get_xp(num)
    half = num.shape[0] // 2
    size = num.size
    coords = slice_coordinates(rots.astype(xp.float32), kx, ky, pad)
    idx, w = _trilinear(coords, half)
    idx = idx.ravel()
    v = values.reshape(1, -1)
    wv = (w * v.real).ravel()
    num_flat = num.reshape(-1)
    # real and imaginary parts added through views: no complex temporary of the grid's size
    num_flat.real += xp.bincount(idx, weights=wv, minlength=size)
    wv = (w * v.imag).ravel()
    num_flat.imag += xp.bincount(idx, weights=wv, minlength=size)
    if weights is not None:
        ww = (w * weights.reshape(1, -1)).ravel()
        wgt.reshape(-1)[...] += xp.bincount(idx, weights=ww, minlength=size)


@functools.lru_cache(maxsize=4)
def _packed_lookup(size: int) -> np.ndarray:
    """For every voxel of an odd cube (flat, int32): its packed index p when it is on
    the half ball, -(p + 2) when its Friedel mate is (the value enters conjugated),
    -1 outside the ball."""
    idx = _half_ball_index(size)
    lut = np.full(size**3, -1, dtype=np.int32)
    p = np.arange(len(idx), dtype=np.int32)
    lut[size**3 - 1 - idx] = -(p + 2)
    lut[idx] = p  # last: the centre is its own mate and stays direct
    lut.setflags(write=False)
    return lut


def backproject_packed(
    num_p, wgt_p, size: int, rots, kx, ky, values, weights, pad: int = 2, kernel: str | None = None
) -> None:
    """:func:`backproject` then :func:`hermitian_complete`, kept only on the half ball
    (:func:`half_ball_mask`, in its C order), without the cubes.

    The align jobs' sums files hold these: about a quarter of the cube, summed
    across shards as is. Every grid point a slice within the grid's radius can
    touch is inside the ball (grid half size = pad * radius + 2, trilinear reach < 2).
    Adds into packed sums num_p (n_packed,) complex and wgt_p (n_packed,) real, on
    the device of ``values``, for a grid of odd size ``size``: each trilinear
    contribution goes to its voxel's place on the half ball, conjugated when it is
    the Friedel mate that lies there; the centre gets v + conj(v). The same
    numbers as backprojecting into full cubes and completing them, with no cube of
    size**3 in memory (1.2 GB per class at box 128 in complex128 + float64).
    On the CPU a compiled scatter (``kernels.backproject_packed_kernel``) adds the
    same products in float64 unless ``kernel="numpy"`` (see :func:`project`).
    """
    xp = get_xp(values)
    if kernels.use_numba(xp, kernel):
        lut = _packed_lookup(size)
        b = rots.shape[0]
        vals = np.ascontiguousarray(values).reshape(b, -1)
        if weights is None:
            wts, wgt = np.empty((0, vals.shape[1]), np.float32), np.empty(0, np.float64)
        else:
            wts, wgt = np.ascontiguousarray(weights).reshape(b, -1), wgt_p
        kxp, kyp = _points_times_pad(kx, ky, pad)
        rots32 = np.ascontiguousarray(rots, dtype=np.float32)
        centre = int(lut[(size**3 - 1) // 2])
        kernels.compiled().backproject_packed_kernel(
            num_p, wgt, lut, centre, size, rots32, kxp, kyp, vals, wts
        )
        return
    half = size // 2
    n_p = num_p.shape[0]
    coords = slice_coordinates(rots.astype(xp.float32), kx, ky, pad)
    idx, w = _trilinear(coords, half)
    lut = _packed_lookup(size)
    code = xp.asarray(lut)[idx.ravel()]
    mate = code < -1
    # a point outside the ball (code -1, impossible by the grid's size) would give
    # p = -1, which bincount refuses
    p = xp.where(mate, -code - 2, code)
    centre = int(lut[(size**3 - 1) // 2])
    v = values.reshape(1, -1)
    re = (w * v.real).ravel()
    im = (w * v.imag).ravel()
    im = xp.where(mate, -im, im)  # conj for contributions that land on the mate
    re_sum = xp.bincount(p, weights=re, minlength=n_p)
    im_sum = xp.bincount(p, weights=im, minlength=n_p)
    re_sum[centre] *= 2  # the centre is its own mate: it holds v + conj(v)
    im_sum[centre] = 0
    num_p.real += re_sum
    num_p.imag += im_sum
    if weights is not None:
        w_sum = xp.bincount(p, weights=(w * weights.reshape(1, -1)).ravel(), minlength=n_p)
        w_sum[centre] *= 2
        wgt_p += w_sum


# contributions (images x points) backprojected at once by backproject_poses_packed:
# bounds its temporaries (about 100 bytes per point with the 8 trilinear corners)
POSES_BLOCK_POINTS = 1 << 20


def backproject_poses_packed(
    num_p,
    wgt_p,
    size: int,
    rots,
    shifts,
    pose_weights,
    kx,
    ky,
    values,
    weights,
    box: int,
    pad: int = 2,
    kernel: str | None = None,
) -> None:
    """:func:`backproject_packed` of each image over its significant poses (pose
    marginalisation, as RELION's maximisation step): image i enters at pose j with
    its values moved back by shift j, both sums scaled by the pose's weight.

    rots (b, P, 3, 3); shifts (b, P, 2) pixels (the particle's content moved by
    +shift, as the pose search returns them); pose_weights (b, P), zero for padding
    (only poses with a positive weight are expanded); values (b, m) complex, e.g.
    class weight x CTF x image / sigma2 before centring; weights (b, m) real, e.g.
    class weight x CTF^2 / sigma2, or None. With one pose of weight 1 per image it
    is exactly the best-pose backprojection of the centred image.

    Poses of one image that share a rotation (the same rotation at several shifts)
    are summed in 2D first, sum_j w_j conj(ph_j) values, and backprojected once
    with weight sum_j w_j: the same sums, one slice per distinct rotation.
    """
    xp = get_xp(values)
    pw = np.asarray(pose_weights, dtype=np.float64)
    img, pose = np.nonzero(pw > 0)
    if img.shape[0] == 0:
        return
    r_all = np.asarray(rots, dtype=np.float64)[img, pose]
    key = np.concatenate([img[:, None].astype(np.float64), r_all.reshape(-1, 9)], axis=1)
    _, first, group = np.unique(key, axis=0, return_index=True, return_inverse=True)
    group = group.ravel()
    n_g, m = len(first), values.shape[1]
    w = pw[img, pose]
    per = max(1, POSES_BLOCK_POINTS // max(m, 1))
    order = np.argsort(group, kind="stable")  # poses grouped by (image, rotation)
    bounds = np.searchsorted(group[order], np.arange(0, n_g + 1))
    for g0 in range(0, n_g, per):
        g1 = min(g0 + per, n_g)
        sel = order[bounds[g0] : bounds[g1]]  # the poses of groups g0..g1-1
        ph = phase_shifts(
            kx, ky, xp.asarray(np.asarray(shifts, np.float32)[img[sel], pose[sel]]), box
        )
        fac = ph.conj() * xp.asarray(w[sel].astype(np.float32))[:, None]  # (poses, m)
        if xp is np:  # rows already grouped: one reduceat
            comb = np.add.reduceat(fac, bounds[g0:g1] - bounds[g0], axis=0)
        else:
            comb = xp.zeros((g1 - g0, m), dtype=xp.complex64)
            gl = xp.asarray(group[sel] - g0)
            xp.add.at(comb.real, gl, fac.real)  # CuPy: real and imaginary parts apart
            xp.add.at(comb.imag, gl, fac.imag)
        gi = first[g0:g1]
        src = xp.asarray(img[gi])
        w_g = np.bincount(group[sel] - g0, weights=w[sel], minlength=g1 - g0).astype(np.float32)
        vals = values[src] * comb
        wts = None if weights is None else weights[src] * xp.asarray(w_g)[:, None]
        r_g = xp.asarray(r_all[gi])
        backproject_packed(num_p, wgt_p, size, r_g, kx, ky, vals, wts, pad, kernel)


def hermitian_complete(num, wgt):
    """Add the Friedel mates of half-plane backprojections: num(k) + conj(num(-k))."""
    xp = get_xp(num)
    return num + xp.conj(num[::-1, ::-1, ::-1]), wgt + wgt[::-1, ::-1, ::-1]


def half_ball_mask(size: int) -> np.ndarray:
    """Boolean cube (n, n, n), n odd: one voxel of every Friedel pair (k, -k) within
    the inscribed ball, and the centre. Holds what a Hermitian grid needs: 26% of
    the cube (half of the 52% ball)."""
    c = size // 2
    z, y, x = np.ogrid[-c : c + 1, -c : c + 1, -c : c + 1]
    half = (z > 0) | ((z == 0) & (y > 0)) | ((z == 0) & (y == 0) & (x >= 0))
    return half & (x * x + y * y + z * z <= c * c)


@functools.lru_cache(maxsize=8)
def _half_ball_index(size: int) -> np.ndarray:
    """Flat indices of :func:`half_ball_mask` (C order). The Friedel mate of flat
    index i in an odd cube is size**3 - 1 - i."""
    idx = np.flatnonzero(half_ball_mask(size))
    idx.setflags(write=False)
    return idx


def hermitian_unpack(num_p, wgt_p, size: int):
    """Packed half-ball sums (:func:`backproject_packed`) -> full Hermitian cubes
    (n, n, n) on the host."""
    idx = _half_ball_index(size)
    mate = size**3 - 1 - idx
    num = np.zeros(size**3, dtype=num_p.dtype)
    wgt = np.zeros(size**3, dtype=wgt_p.dtype)
    num[mate], wgt[mate] = np.conj(num_p), wgt_p
    num[idx], wgt[idx] = num_p, wgt_p  # last: the centre is its own mate
    return num.reshape((size,) * 3), wgt.reshape((size,) * 3)


def phase_shifts(kx, ky, shifts, box: int):
    """Phase factors (s, m) that translate an image by ``shifts`` (s, 2) pixels (x, y).

    Multiplying a centred image transform by these moves its content by +shift.
    """
    xp = get_xp(kx)
    arg = (-2.0 * np.pi / box) * (shifts[:, 0:1] * kx[None, :] + shifts[:, 1:2] * ky[None, :])
    return (xp.cos(arg) + 1j * xp.sin(arg)).astype(xp.complex64)
