"""The Gaussian log-likelihood of particle images against reference slices, in the
pieces the coarse and local pose searches share (``hetrefine.alignment``).

For a particle transform Y (half plane, within a resolution radius), its CTF C, the
noise power sigma2 per frequency and a reference slice A (pose r, shift t):

    log L(r, t) = const + sum_k [2 Re(conj(Y conj(ph_t) C / sigma2) A) - C^2 |A|^2 / sigma2]

:class:`FrequencyLevel` holds the frequencies within one radius and the weighted
images; :func:`loglik` turns the cross and norm terms into the log-likelihood (with
an optional per-particle scale); :func:`sum_exp_near_max` sums the likelihood over
poses for the class evidence without exponentiating what cannot matter.
"""

from __future__ import annotations

import numpy as np

from hetrefine import kernels
from hetrefine.backend import get_xp, to_host
from hetrefine.ctf import compute_ctf
from hetrefine.fourier import half_plane_indices
from hetrefine.projection import phase_shifts, project


class FrequencyLevel:
    """Frequencies, CTF and weighted images of a particle batch within one radius."""

    def __init__(self, spectra, ctf_params, sigma2, settings, radius: float):
        xp = get_xp(spectra)
        box = settings.box
        flat, kx, ky = half_plane_indices(box, radius, xp)
        self.kx, self.ky = kx, ky
        n = spectra.shape[0]
        self.y = spectra.reshape(n, -1)[:, flat]
        freq = 1.0 / (box * settings.pixel_size)
        self.ctf = compute_ctf(ctf_params, kx * freq, ky * freq)
        shells = xp.rint(xp.sqrt(kx * kx + ky * ky)).astype(xp.int64)
        # sigma2 (shells,), or (n, shells): each particle its optics group's spectrum
        inv_s2 = (1.0 / sigma2[..., shells]).astype(xp.float32)
        inv_s2 = inv_s2 if inv_s2.ndim == 2 else inv_s2[None, :]
        self.ctf_w = self.ctf * inv_s2  # C / sigma2
        self.ctf2_w = self.ctf * self.ctf_w  # C^2 / sigma2
        self.y_norm = (xp.abs(self.y) ** 2 * inv_s2).sum(axis=1)  # sum |Y|^2/s2

    def rows(self, idx) -> FrequencyLevel:
        """The level of particles ``idx`` (device index array) only: every quantity is
        per particle, so this equals the level built from those particles alone."""
        sub = object.__new__(FrequencyLevel)
        sub.kx, sub.ky = self.kx, self.ky
        for name in ("y", "ctf", "ctf_w", "ctf2_w", "y_norm"):
            setattr(sub, name, getattr(self, name)[idx])
        return sub


class LevelCache:
    """The particles' :class:`FrequencyLevel` per local radius, built once for all
    classes (their CTFs and weighted transforms do not depend on the class; at box
    128 rebuilding them per class and level was 4% of the search)."""

    def __init__(self, spectra, ctf_params, sigma2, settings):
        self.args = (spectra, ctf_params, sigma2, settings)
        self.levels: dict[float, FrequencyLevel] = {}

    def get(self, radius: float) -> FrequencyLevel:
        if radius not in self.levels:
            self.levels[radius] = FrequencyLevel(*self.args, radius)
        return self.levels[radius]

    def rows(self, rows):
        """A function radius -> the level of particles ``rows`` (None: all)."""
        if rows is None:
            return self.get
        xp = get_xp(self.args[0])
        r_x = xp.asarray(rows)
        return lambda radius: self.get(radius).rows(r_x)


def loglik(cross, norm, fit_scale: bool, xp):
    """Pose-dependent log-likelihood 2 a cross - a^2 norm, with a = 1 or, with a
    per-particle scale, a = max(cross / norm, 0) (giving cross^2 / norm)."""
    if not fit_scale:
        return 2.0 * cross - norm
    a = xp.maximum(cross, 0) / xp.maximum(norm, 1e-30)
    return a * cross


def loglik_inplace(cross, norm, fit_scale: bool, xp):
    """:func:`loglik` overwriting ``cross`` (the coarse search's large array); without
    a per-particle scale ``cross`` must already carry the factor 2."""
    if not fit_scale:
        cross -= norm
        return cross
    a = xp.maximum(cross, 0) / xp.maximum(norm, 1e-30)
    cross *= a
    return cross


def split_real_imag(z, xp):
    return xp.concatenate([z.real, z.imag], axis=-1)


# terms more than this many nats below a particle's best pose are left out of its
# sum of likelihoods: together (at most ~1e5 of them) they weigh under 1e-17 of it
LSE_CUTOFF_NATS = 50.0


def sum_exp_near_max(ll, ll_r, mx, xp):
    """sum over (shift, rotation) of exp(ll - mx) per particle, float64.

    ll (b, S, R); ll_r (b, R) its maximum over shifts; mx (b,) the overall maximum.
    On the CPU only rotations whose best shift is within LSE_CUTOFF_NATS of the
    maximum are exponentiated, compressed out one particle at a time (contiguous
    rows: about 4x cheaper than a fancy-index gather). Early iterations keep most
    rotations (75% at iteration 1 of benchmark set (a), 23% at iteration 3); later
    ones a fraction of a percent, where this saves nearly all of the exp pass over
    the GEMM output. On a GPU the whole array is exponentiated (cheap there).
    """
    if xp is not np:
        ll -= mx[:, None, None]
        xp.exp(ll, out=ll)
        return ll.sum(axis=(1, 2), dtype=xp.float64)
    near = ll_r > (mx - LSE_CUTOFF_NATS)[:, None]
    out = np.empty(ll.shape[0], dtype=np.float64)
    for p in range(ll.shape[0]):
        v = np.compress(near[p], ll[p], axis=1)  # (S, rotations near the best)
        v -= mx[p]
        np.exp(v, out=v)
        out[p] = v.sum(dtype=np.float64)
    return out


def reduce_coarse(cross, norm, nb: int, n_s: int, n_c: int, fit_scale: bool, xp, kernel=None):
    """What the coarse search keeps of one batch's GEMMs.

    cross (>= nb n_s, R): the cross GEMM's output, rows particle-major then shift
    (times 2 unless ``fit_scale``), overwritten; norm (>= nb, R): the norm GEMM's.
    Returns, per particle, the ``n_c`` best rotations by their best shift's
    log-likelihood, best first (r_idx (nb, n_c)), each one's best shift (s_idx) and
    log-likelihood (top_ll), the best log-likelihood mx (nb,) and the sum of
    exp(ll - mx) over every (shift, rotation) (:func:`sum_exp_near_max`, float64).

    On the CPU a compiled kernel (``kernels.coarse_reduce_kernel``) makes one pass
    over each particle's block while it is in cache, in place of the numpy path's
    passes over the whole batch (subtraction, maximum, partition, exp): the same
    float32 values, the sum to float32 rounding (its own exp and order), unless
    ``kernel="numpy"`` (or ``HETREFINE_KERNELS=numpy``).
    """
    if kernels.use_numba(xp, kernel) and cross.dtype == np.float32:
        r_idx = np.empty((nb, n_c), np.int64)
        s_idx = np.empty((nb, n_c), np.int64)
        top_ll = np.empty((nb, n_c), np.float32)
        mx = np.empty(nb, np.float32)
        total = np.empty(nb, np.float64)
        kernels.compiled().coarse_reduce_kernel(
            np.ascontiguousarray(cross), np.ascontiguousarray(norm, dtype=np.float32), n_s,
            bool(fit_scale), LSE_CUTOFF_NATS, r_idx, s_idx, top_ll, mx, total,
        )  # fmt: skip
        return r_idx, s_idx, top_ll, mx, total
    n_r = cross.shape[1]
    ll = cross[: nb * n_s].reshape(nb, n_s, n_r)
    ll = loglik_inplace(ll, norm[:nb, None, :], fit_scale, xp)
    ll_r = ll.max(axis=1)  # best shift per rotation, (b, R)
    mx = ll_r.max(axis=1)
    top = xp.argpartition(-ll_r, n_c - 1, axis=1)[:, :n_c]
    top_ll = xp.take_along_axis(ll_r, top, axis=1)
    order = xp.argsort(-top_ll, axis=1)
    r_idx = xp.take_along_axis(top, order, axis=1)
    top_ll = xp.take_along_axis(top_ll, order, axis=1)
    s_idx = ll[xp.arange(nb)[:, None], :, r_idx].argmax(axis=-1)  # (b, C)
    return r_idx, s_idx, top_ll, mx, sum_exp_near_max(ll, ll_r, mx, xp)


def fit_terms_at_poses(spectra, ctf_params, sigma2, settings, grids, cls, rots, shifts):
    """Cross and norm terms per Fourier shell of each particle against one class at one
    pose, within ``settings.res_limit_px`` (the inputs of ``classification.fit_score``).

    spectra (n, D, D//2+1) rfft of the particles; ctf_params (n, 8); sigma2 per shell;
    grids: K reference grids (``projection.prepare_reference``); cls (n,) 0-based class
    of each particle; rots (n, 3, 3); shifts (n, 2) pixels (content moved by +shift).
    Returns host float64 arrays (n, S), S = D//2+1 shells (rounded radius): cross =
    sum Re(conj(Y conj(ph_t)) C A) / sigma2 and norm = sum C^2 |A|^2 / sigma2 over the
    shell's half-plane frequencies (each Friedel pair once).
    """
    xp = get_xp(spectra)
    lev = FrequencyLevel(spectra, ctf_params, sigma2, settings, settings.res_limit_px)
    n, n_sh = spectra.shape[0], settings.box // 2 + 1
    shells = to_host(xp.rint(xp.sqrt(lev.kx * lev.kx + lev.ky * lev.ky))).astype(np.int64)
    # (m, S) indicator of each frequency's shell: per-shell sums as one product
    member = xp.asarray(np.eye(n_sh, dtype=np.float32)[np.minimum(shells, n_sh - 1)])
    cross, norm = np.zeros((n, n_sh)), np.zeros((n, n_sh))
    cls = np.asarray(cls)
    for k, grid in enumerate(grids):
        rows = np.flatnonzero(cls == k)
        if len(rows) == 0:
            continue
        r_x = xp.asarray(rows)
        a = project(grid, xp.asarray(rots[rows], dtype=xp.float32), lev.kx, lev.ky, settings.pad)
        ph = phase_shifts(lev.kx, lev.ky, xp.asarray(shifts[rows], dtype=xp.float32), settings.box)
        x = lev.y[r_x] * ph.conj() * lev.ctf_w[r_x]  # Y conj(ph) C / sigma2
        cross[rows] = to_host((x.conj() * a).real @ member)
        norm[rows] = to_host((lev.ctf2_w[r_x] * (a.real**2 + a.imag**2)) @ member)
    return cross, norm
