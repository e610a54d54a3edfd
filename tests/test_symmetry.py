"""Point groups against RELION 3.1's own matrices; symmetrising; asymmetric-unit reduction.

RELION convention found (relion_refine 3.1.3 --print_symmetry_ops): the printed R(i) are
rotation matrices on column vectors; for the generator "rotation by +360/n about the
axis" RELION prints its inverse (C4's R(2) is [[0,1,0],[-1,0,0],[0,0,1]], Euler
(0, 0, 90)). Groups are closed under inversion, so the sets compare equal as they are.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from hetrefine.backend import to_device, to_host
from hetrefine.errors import InputError
from hetrefine.symmetrize import symmetrize_fourier, symmetrize_volume
from hetrefine.symmetry import asymmetric_unit_mask, symmetry_matrices

ORDERS = {
    "C1": 1, "C2": 2, "C5": 5, "c7": 7, "D1": 2, "D2": 4, "d3": 6, "D6": 12,
    "T": 12, "O": 24, "I": 60, "i1": 60, "I2": 60, "I3": 60, "I4": 60,
}  # fmt: skip


def _find(mats: np.ndarray, m: np.ndarray, tol: float = 1e-6) -> int:
    d = np.abs(mats - m[None]).max(axis=(1, 2))
    return int(np.argmin(d)) if d.min() < tol else -1


@pytest.mark.parametrize("symbol,order", ORDERS.items())
def test_orders_identity_and_closure(symbol, order):
    g = symmetry_matrices(symbol)
    assert g.shape == (order, 3, 3)
    np.testing.assert_allclose(g[0], np.eye(3), atol=1e-12)
    np.testing.assert_allclose(
        g @ g.transpose(0, 2, 1), np.broadcast_to(np.eye(3), g.shape), atol=1e-10
    )
    np.testing.assert_allclose(np.linalg.det(g), 1.0, atol=1e-10)
    # distinct elements, closed under products
    assert len({tuple(np.round(m, 5).ravel() + 0.0) for m in g}) == order
    for a in g:
        for b in g:
            assert _find(g, a @ b) >= 0


def test_axes():
    """Cn about z, Dn adds a 2-fold about x (RELION's frame)."""
    c6 = symmetry_matrices("C6")
    assert _find(c6, Rotation.from_euler("z", 60, degrees=True).as_matrix()) >= 0
    assert np.allclose(c6[:, 2, 2], 1.0)
    d4 = symmetry_matrices("D4")
    assert _find(d4, np.diag([1.0, -1.0, -1.0])) >= 0
    assert _find(d4, np.diag([-1.0, 1.0, -1.0])) >= 0


def _parse_relion_ops(text: str) -> np.ndarray:
    lines = text.splitlines()
    mats = []
    for i, line in enumerate(lines):
        if re.match(r"\s*R\(\d+\)=", line):
            mats.append([[float(v) for v in lines[i + j].split()] for j in (1, 2, 3)])
    return np.array(mats)


@pytest.mark.skipif(shutil.which("relion_refine") is None, reason="relion_refine not on PATH")
@pytest.mark.parametrize(
    "symbol", ["C1", "C4", "C7", "D1", "D2", "D5", "T", "O", "I", "I1", "I2", "I3", "I4"]
)
def test_matches_relion_print_symmetry_ops(symbol, tmp_path):
    out = subprocess.run(
        ["relion_refine", "--sym", symbol, "--print_symmetry_ops"],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    rel = _parse_relion_ops(out.stdout + out.stderr)
    ours = symmetry_matrices(symbol)
    assert rel.shape == ours.shape, out.stdout[-500:]
    # RELION prints ~5 significant digits; compare as sets both ways
    d = np.abs(ours[:, None] - rel[None]).max(axis=(2, 3))
    assert d.min(axis=1).max() < 1e-4
    assert d.min(axis=0).max() < 1e-4
    np.testing.assert_allclose(rel[0], np.eye(3))


@pytest.mark.parametrize("bad", ["X5", "C0", "D0", "D1x", "", "I5", "C-2", "Oh", "C 3x", None, 4])
def test_bad_symbols_refused(bad):
    with pytest.raises(InputError) as err:
        symmetry_matrices(bad)
    assert err.value.where == "symmetry"
    msg = str(err.value)
    assert "C<n>" in msg and "D<n>" in msg and "I1" in msg and "O" in msg


def _smooth_random_volume(d: int, seed: int) -> np.ndarray:
    """A smooth, asymmetric random blob (d, d, d) indexed (z, y, x), zero near the edge."""
    rng = np.random.default_rng(seed)
    c = np.arange(d) - d // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    r = np.sqrt(x * x + y * y + z * z)
    vol = rng.standard_normal((d, d, d)) * (r < d / 2 - 6)
    return ndimage.gaussian_filter(vol, 2.0).astype(np.float32)


def _rotate(vol: np.ndarray, a: np.ndarray, order: int = 3) -> np.ndarray:
    """vol(a^T r) about the centre D//2 (vol indexed (z, y, x)); an independent helper."""
    d = vol.shape[0]
    c = np.arange(d) - d // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    r = np.stack([x.ravel(), y.ravel(), z.ravel()]).astype(np.float64)
    q = a.T @ r
    coords = np.stack([q[2], q[1], q[0]]) + d // 2
    return ndimage.map_coordinates(vol, coords, order=order).reshape(vol.shape)


def _project_z(vol: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Our projection convention in real space: sum over z of vol(A^T r)."""
    return _rotate(vol, a).sum(axis=0)


@pytest.mark.parametrize("symbol", ["C3", "D2", "T", "O", "I"])
def test_symmetrized_volume_is_invariant(symbol, xp):
    d = 32
    vol = _smooth_random_volume(d, 1)
    mats = symmetry_matrices(symbol)
    sym = to_host(symmetrize_volume(to_device(vol, xp), mats, order=3))
    assert sym.shape == vol.shape
    c = np.arange(d) - d // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    inner = np.sqrt(x * x + y * y + z * z) < d / 2 - 4
    scale = np.abs(sym[inner]).max()
    # the symmetrised map really changed (the input was not symmetric) ...
    assert np.abs(sym - vol)[inner].max() > 0.2 * scale
    # ... and is invariant under every element, within interpolation error
    for g in mats[1:]:
        rot = _rotate(sym, g)
        err = np.abs(rot - sym)[inner].max()
        assert err < 0.01 * scale, (symbol, err / scale)


def test_symmetrize_c1_is_identity():
    vol = _smooth_random_volume(16, 2)
    np.testing.assert_array_equal(symmetrize_volume(vol, symmetry_matrices("C1")), vol)


@pytest.mark.parametrize("symbol", ["C4", "D3", "O"])
def test_symmetrize_fourier_sum_of_rotated_blobs(symbol, xp):
    """A Gaussian blob at k0 becomes the sum of blobs at g k0 (sum over the group)."""
    p = 33
    c = np.arange(p) - p // 2
    kz, ky, kx = np.meshgrid(c, c, c, indexing="ij")
    k = np.stack([kx, ky, kz], axis=-1).astype(np.float64)
    k0 = np.array([5.0, -3.0, 7.0])
    s = 2.5

    def blob(center):
        return np.exp(-((k - center) ** 2).sum(-1) / (2 * s * s))

    grid = ((1.0 + 2.0j) * blob(k0)).astype(np.complex64)
    mats = symmetry_matrices(symbol)
    out = to_host(symmetrize_fourier(to_device(grid, xp), mats))
    expect = (1.0 + 2.0j) * sum(blob(g @ k0) for g in mats)
    assert out.shape == grid.shape and np.iscomplexobj(out)
    # trilinear interpolation of a blob of width 2.5 voxels: a few percent at the peaks
    err = float(np.abs(out - expect).max() / np.abs(expect).max())
    assert err < 0.08, err
    # the sum (not the mean): total weight is n times the input's
    np.testing.assert_allclose(np.abs(out).sum(), len(mats) * np.abs(grid).sum(), rtol=0.02)
    # real input stays real
    real = to_host(symmetrize_fourier(to_device(blob(k0).astype(np.float32), xp), mats))
    assert not np.iscomplexobj(real)
    np.testing.assert_allclose(real, expect.real, atol=0.08 * np.abs(expect.real).max())


def test_equivalent_poses_act_on_the_right():
    """For V(g r) = V(r), poses A and A g give the same image; g A in general does not."""
    vol = _smooth_random_volume(32, 3)
    mats = symmetry_matrices("C4")
    sym = symmetrize_volume(vol, mats, order=3)
    a = Rotation.from_euler("ZYZ", [30.0, 70.0, -40.0], degrees=True).as_matrix().T
    g = mats[1]
    ref = _project_z(sym, a)
    right = _project_z(sym, a @ g)
    left = _project_z(sym, g @ a)
    corr = lambda u, v: np.corrcoef(u.ravel(), v.ravel())[0, 1]  # noqa: E731
    assert corr(ref, right) > 0.99
    assert corr(ref, left) < 0.9


def _angle(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Geodesic angle (degrees) between every a (n,3,3) and b (m,3,3): (n, m)."""
    tr = np.einsum("nij,mij->nm", a, b)
    return np.degrees(np.arccos(np.clip((tr - 1.0) / 2.0, -1.0, 1.0)))


@pytest.mark.parametrize("symbol", ["C2", "D3", "T", "O", "I"])
def test_asymmetric_unit_one_per_orbit(symbol):
    mats = symmetry_matrices(symbol)
    rng = np.random.default_rng(5)
    r = Rotation.random(50, random_state=rng).as_matrix()
    orbits = np.einsum("nij,gjk->ngik", r, mats).reshape(-1, 3, 3)  # A G_i
    keep = asymmetric_unit_mask(orbits, mats).reshape(50, len(mats))
    np.testing.assert_array_equal(keep.sum(axis=1), 1)
    if len(mats) > 1:  # the left coset {G_i A} is not what is reduced
        left = np.einsum("gij,njk->ngik", mats, r).reshape(-1, 3, 3)
        assert (asymmetric_unit_mask(left, mats).reshape(50, len(mats)).sum(1) != 1).any()


@pytest.mark.parametrize("symbol", ["C1", "C4", "D2", "T", "O", "I"])
def test_asymmetric_unit_fraction_and_coverage(symbol, xp):
    mats = symmetry_matrices(symbol)
    n = 30000
    grid = Rotation.random(n, random_state=np.random.default_rng(7)).as_matrix()
    keep = to_host(asymmetric_unit_mask(to_device(grid, xp), mats))
    assert keep.dtype == bool and keep.shape == (n,)
    frac = keep.mean()
    expect = 1.0 / len(mats)
    assert abs(frac - expect) < 4 * np.sqrt(expect * (1 - expect) / n) + 1e-12, frac
    # the reduced grid, expanded by the group, covers SO(3) as well as the full grid does
    kept = grid[keep]
    expanded = np.einsum("nij,gjk->ngik", kept, mats).reshape(-1, 3, 3)
    probe = Rotation.random(100, random_state=np.random.default_rng(8)).as_matrix()
    cover_full = _angle(probe, grid).min(axis=1).max()
    cover_reduced = _angle(probe, expanded).min(axis=1).max()
    assert cover_reduced <= 1.5 * cover_full, (cover_reduced, cover_full)


def test_equivalent_poses_with_fourier_projection():
    """Same check through hetrefine.projection (the kernel's Fourier-slice projector)."""
    projection = pytest.importorskip("hetrefine.projection")
    d = 32
    vol = _smooth_random_volume(d, 4)
    mats = symmetry_matrices("D2")
    sym = symmetrize_volume(vol, mats, order=3)
    grid = projection.prepare_reference(sym, pad=2)
    c = np.arange(d) - d // 2
    ky, kx = np.meshgrid(c, c, indexing="ij")
    inside = kx**2 + ky**2 <= (d // 2 - 1) ** 2
    kx, ky = kx[inside].astype(np.float32), ky[inside].astype(np.float32)
    a = Rotation.from_euler("ZYZ", [-20.0, 55.0, 75.0], degrees=True).as_matrix().T
    poses = np.concatenate([a[None], a[None] @ mats[1:], mats[1:] @ a[None]]).astype(np.float32)
    sl = projection.project(grid, poses, kx, ky, pad=2)

    def corr(u, v):
        return abs(np.vdot(u, v)) / np.linalg.norm(u) / np.linalg.norm(v)

    for i in range(1, len(mats)):
        assert corr(sl[0], sl[i]) > 0.999  # A G_i: the same view
        assert corr(sl[0], sl[len(mats) - 1 + i]) < 0.95  # G_i A: another view


def test_fourier_and_real_space_symmetrising_agree():
    """symmetrize_fourier of a volume's Fourier grid ~ n x the grid of symmetrize_volume."""
    projection = pytest.importorskip("hetrefine.projection")
    d = 32
    vol = _smooth_random_volume(d, 6)
    mats = symmetry_matrices("T")
    f_of_sym = projection.prepare_reference(symmetrize_volume(vol, mats, order=3), pad=2)
    sym_of_f = symmetrize_fourier(projection.prepare_reference(vol, pad=2), mats) / len(mats)
    half = f_of_sym.shape[0] // 2
    c = np.arange(f_of_sym.shape[0]) - half
    kz, ky, kx = np.meshgrid(c, c, c, indexing="ij")
    low = kx**2 + ky**2 + kz**2 <= (half - 4) ** 2
    u, v = f_of_sym[low], sym_of_f[low]
    assert abs(np.vdot(u, v)) / np.linalg.norm(u) / np.linalg.norm(v) > 0.99
    # while the unsymmetrised grid is clearly different
    w = projection.prepare_reference(vol, pad=2)[low]
    assert abs(np.vdot(u, w)) / np.linalg.norm(u) / np.linalg.norm(w) < 0.9


# ------------------------------------------------------------------ issue 13, item 13: speed


def _reference(arr: np.ndarray, mats: np.ndarray, order: int, scale: float) -> np.ndarray:
    """The previous implementation (before issue 13), kept as the reference:
    scipy.ndimage.map_coordinates(mode="constant") per operator, summed."""
    d = arr.shape[0]
    origin = d // 2
    c = np.arange(d, dtype=np.float64) - origin
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    r = np.stack([x.ravel(), y.ravel(), z.ravel()])
    parts = [arr.real, arr.imag] if np.iscomplexobj(arr) else [arr]
    parts = [
        np.ascontiguousarray(p, np.float32 if p.dtype.itemsize <= 4 else p.dtype) for p in parts
    ]
    acc = 0
    for g in mats:
        q = g.T @ r
        coords = np.stack([q[2], q[1], q[0]]) + origin
        v = [ndimage.map_coordinates(p, coords, order=order, mode="constant") for p in parts]
        acc = acc + (v[0] + 1j * v[1] if len(v) == 2 else v[0])
    return (acc * scale).reshape(arr.shape)


def _friedel_sums(p: int, radius: float, seed: int):
    """Friedel-complete random sums (num complex128, wgt float64) inside a ball."""
    rng = np.random.default_rng(seed)
    c = np.arange(p) - p // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    ball = x * x + y * y + z * z <= radius * radius
    num = (rng.standard_normal((p,) * 3) + 1j * rng.standard_normal((p,) * 3)) * ball
    wgt = rng.random((p,) * 3) * ball
    return num + np.conj(num[::-1, ::-1, ::-1]), wgt + wgt[::-1, ::-1, ::-1]


GROUPS = ["C3", "C4", "D3", "D4", "T", "O", "I", "I3"]


@pytest.mark.parametrize("symbol", GROUPS)
@pytest.mark.parametrize("order", [1, 3])
def test_symmetrize_volume_equals_previous_implementation(symbol, order, xp):
    """The vectorised gather (numpy or CuPy) gives scipy's numbers to float32 rounding."""
    vol = np.zeros((24, 24, 24), np.float32)  # zero faces: no read lands on one by rounding
    vol[1:-1, 1:-1, 1:-1] = _smooth_random_volume(24, 11)[1:-1, 1:-1, 1:-1]
    mats = symmetry_matrices(symbol)
    ref = _reference(vol, mats, order, 1.0 / len(mats))
    out = to_host(symmetrize_volume(to_device(vol, xp), mats, order=order))
    assert out.dtype == np.float32 and out.shape == vol.shape
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-6 * np.abs(ref).max())


@pytest.mark.parametrize("symbol", GROUPS)
def test_symmetrize_fourier_equals_previous_implementation(symbol, xp):
    from hetrefine.symmetrize import symmetrize_fourier_sums

    p = 29
    num, wgt = _friedel_sums(p, p // 2 - 1, 12)
    mats = symmetry_matrices(symbol)
    ref_n, ref_w = _reference(num, mats, 1, 1.0), _reference(wgt, mats, 1, 1.0)
    tol = 1e-12 * np.abs(ref_n).max()
    for hermitian in (False, True):
        out = to_host(symmetrize_fourier(to_device(num, xp), mats, hermitian=hermitian))
        assert out.dtype == np.complex128
        np.testing.assert_allclose(out, ref_n, rtol=0, atol=tol)
    n_out, w_out = symmetrize_fourier_sums(to_device(num, xp), to_device(wgt, xp), mats)
    np.testing.assert_allclose(to_host(n_out), ref_n, rtol=0, atol=tol)
    np.testing.assert_allclose(to_host(w_out), ref_w, rtol=0, atol=1e-12 * np.abs(ref_w).max())
    # a grid filling the cube to its faces: the same, except where a read lands on a
    # face up to rounding (scipy then gives 0 or the face value by the last bit)
    full = np.random.default_rng(13).standard_normal((p,) * 3).astype(np.float32)
    out = to_host(symmetrize_fourier(to_device(full, xp), mats))
    ref = _reference(full, mats, 1, 1.0)
    inner = np.zeros_like(full, dtype=bool)
    inner[1:-1, 1:-1, 1:-1] = True
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[inner], ref[inner], rtol=0, atol=1e-5 * np.abs(ref).max())


def test_icosahedral_symmetrising_reads_15_cosets_on_a_24th_of_the_ball(monkeypatch):
    """I (RELION's I2) holds 12 signed permutations that map the grid onto itself (a
    tetrahedral subgroup: 2-folds on x, y, z and 3-folds on the cube diagonals). The
    sums are summed over its three 2-folds exactly (flips, no interpolation), read at one
    operator per coset (15), on one voxel per orbit of the 12 and of the Friedel
    symmetry (1/24 of the ball). The previous code interpolated all 60 operators at
    every voxel of the cube: 2.4 % of that work is left."""
    from hetrefine import symmetrize

    mats = symmetry_matrices("I")
    assert len(symmetrize._grid_symmetries(mats)) == 12
    counted = []
    real = symmetrize._group_sum

    def counting(src, shape, mats, origin, order, points):
        counted.append(len(points) * len(mats))
        return real(src, shape, mats, origin, order, points)

    monkeypatch.setattr(symmetrize, "_group_sum", counting)
    p = 41
    num, wgt = _friedel_sums(p, 16, 14)
    n_out, w_out = symmetrize.symmetrize_fourier_sums(num, wgt, mats)
    ball = 4 / 3 * np.pi * (16 + np.sqrt(3)) ** 3
    assert counted and sum(counted) < 15 * ball / 24 * 1.2, (sum(counted), 15 * ball / 24)
    np.testing.assert_allclose(
        n_out, _reference(num, mats, 1, 1.0), rtol=0, atol=1e-12 * np.abs(n_out).max()
    )


def test_friedel_symmetry_is_detected_exactly():
    from hetrefine.symmetrize import _is_friedel_symmetric

    num, wgt = _friedel_sums(15, 6, 15)
    assert _is_friedel_symmetric(num) and _is_friedel_symmetric(wgt)
    # detected or not, the result is the same
    mats = symmetry_matrices("T")
    np.testing.assert_allclose(
        symmetrize_fourier(num, mats),
        symmetrize_fourier(num, mats, hermitian=False),
        rtol=0,
        atol=1e-12,
    )
    num[3, 4, 5] += 1e-12
    assert not _is_friedel_symmetric(num)
    assert not _is_friedel_symmetric(np.zeros((14, 14, 14)))
