"""Pose search: Gaussian log-likelihoods as matrix products, coarse to fine.

For a particle transform Y (half plane, within a resolution radius), its CTF C,
the noise power sigma2 per frequency and a reference slice A_r (pose r), with
the particle's content moved by shift t (phase factor ph_t):

    log L(r, t) = -sum_k |Y - ph_t C A_r|^2 / sigma2
                = const + sum_k [2 Re(conj(Y conj(ph_t) C / sigma2) A_r) - C^2 |A_r|^2 / sigma2]

(the half-plane sum counts each Friedel pair once; E|noise|^2 = sigma2 per
complex coefficient). The cross term for all (particle, shift) x (pose) pairs
is one real GEMM of [Re X, Im X] (b*S, 2m) with [Re A; Im A] (2m, R), the norm
term another GEMM (b, m) x (m, R).

Search: a global grid at the coarse step and a low radius, keeping the best
``n_candidates`` (pose, shift) per particle and class; then ``levels`` local
refinements, each halving the angular and shift steps around the best poses
(19 rotations of the 3 x 3 x 3 cube without its corners x 3 x 3 shifts per
candidate) at a higher radius.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hetrefine.backend import get_xp, to_host
from hetrefine.likelihood import (
    FrequencyLevel,
    LevelCache,
    loglik,
    reduce_coarse,
    split_real_imag,
)
from hetrefine.projection import PAD, phase_shifts, project, slice_scores
from hetrefine.sampling import levels_for_resolution, local_shift_offsets, perturbations, shift_grid


@dataclass(frozen=True)
class SearchSettings:
    """How the pose search runs (angles in degrees, shifts in refinement-box pixels)."""

    box: int
    pixel_size: float
    res_limit_px: float
    coarse_step_deg: float = 15.0
    levels: int = 2
    shift_range_px: float = 3.0
    shift_step_px: float = 1.0
    n_candidates: int = 2
    pad: int = 2
    batch_size: int = 64
    radius_factor: float = 3.0
    per_particle_scale: bool = False
    local_points: int = 19  # rotations per local step: 19 (cube without corners) or 27
    # significant poses kept per particle and class from the final local level (pose
    # marginalisation): the most probable ones until their cumulative posterior
    # reaches ``significant_mass``, at most ``max_significant`` (8: on
    # benchmark adk2_snr005 the same accuracy and maps as 16 at 1.36x instead of
    # 1.51x the CPU time of best-pose backprojection)
    max_significant: int = 8
    significant_mass: float = 0.999
    # with a particle radius (pixels), the local levels follow the resolution:
    # at least ``levels``, as many as :func:`sampling.levels_for_resolution` asks
    # for (the final step near resolution / (pi radius), not under min_step_deg)
    particle_radius_px: float | None = None
    min_step_deg: float = 1.0
    max_levels: int = 5

    @classmethod
    def from_config(
        cls, box: int, pixel_size: float, res_limit_px: float, settings
    ) -> SearchSettings:
        """The search a step runs: its config ``settings`` (the search keys) at this box,
        pixel size and alignment limit."""
        return cls(
            box=int(box),
            pixel_size=float(pixel_size),
            res_limit_px=float(res_limit_px),
            coarse_step_deg=float(settings["coarse_angle_step_deg"]),
            levels=int(settings["local_refine_levels"]),
            shift_range_px=float(settings["shift_range_px"]),
            shift_step_px=float(settings["shift_step_px"]),
            pad=PAD,
            per_particle_scale=bool(settings["per_particle_scale"]),
        )

    @property
    def n_levels(self) -> int:
        """Local levels this search runs (see ``particle_radius_px``)."""
        if self.particle_radius_px is None or self.levels == 0:
            return self.levels
        auto = levels_for_resolution(
            self.res_limit_px, self.particle_radius_px, self.coarse_step_deg, self.box,
            self.min_step_deg, self.max_levels,
        )  # fmt: skip
        return max(self.levels, auto)

    def radius_for_step(self, step_deg: float) -> float:
        """Highest radius worth using at an angular step (phase error ~1 px at the edge)."""
        r = self.radius_factor / np.deg2rad(step_deg)
        return float(min(self.res_limit_px, max(r, 4.0)))


@dataclass
class PoseResult:
    """Best pose per particle and class, and the class scores.

    rots (n, K, 3, 3); shifts (n, K, 2) in pixels (x, y), the particle's content
    moved by +shift from the box centre; score (n, K): log-sum-exp of the
    log-likelihood over the final local search (the class evidence);
    best_ll (n, K): the maximum log-likelihood including the pose-independent
    term; pose_peak (n, K): the probability of the best pose in the final local
    search (1 = perfectly peaked); scale (n, K): the particle's intensity scale at
    its best pose (1 unless ``per_particle_scale``).

    The significant poses of the final local level, for backprojection over the
    pose posterior (``projection.backproject_poses_packed``): sig_rots
    (n, K, P, 3, 3), sig_shifts (n, K, P, 2) pixels, sig_weights (n, K, P) the
    pose posterior renormalised over the kept poses (sum 1; zero-padded, the
    best pose first). A (particle, class) pair without local refinement has its
    best pose with weight 1.

    fine_evidence (n, K): the class evidence from the final local level (its
    log-sum-exp plus the log of its sample volume over the whole pose volume: the
    log mean likelihood over all poses where the posterior lies within the final
    window). Only differences between the classes of one particle mean anything:
    the final level's radius adds noise terms that the coarse one lacks. Pairs not
    refined keep their coarse evidence relative to the particle's best refined
    class.

    coarse_peak (n, K): the share of the coarse pose posterior held by its best
    (rotation, shift) (1 for given poses): how much of it the local levels' window
    around that cell can hold (``classification.gated_class_evidence``).
    """

    rots: np.ndarray
    shifts: np.ndarray
    score: np.ndarray
    best_ll: np.ndarray
    pose_peak: np.ndarray
    coarse_evidence: np.ndarray | None = None
    scale: np.ndarray | None = None
    sig_rots: np.ndarray | None = None
    sig_shifts: np.ndarray | None = None
    sig_weights: np.ndarray | None = None
    fine_evidence: np.ndarray | None = None
    coarse_peak: np.ndarray | None = None


def coarse_search(spectra, ctf_params, sigma2, grids, rots, settings: SearchSettings):
    """Global search: the best ``n_candidates`` rotations (each with its best shift)
    per particle and class.

    spectra: (n, D, D//2+1) rfft of the particles; grids: K reference Fourier grids
    (from ``projection.prepare_reference``); rots: (R, 3, 3) global grid.
    Returns (rot_idx (n, K, C), shifts (n, K, C, 2) pixels, ll (n, K, C),
    evidence (n, K)): the log of the mean likelihood over the whole grid, i.e. the
    class evidence with the pose marginalised under a uniform prior.
    """
    xp = get_xp(spectra)
    radius = settings.radius_for_step(settings.coarse_step_deg)
    lev = FrequencyLevel(spectra, ctf_params, sigma2, settings, radius)
    shifts = xp.asarray(
        shift_grid(settings.shift_range_px, settings.shift_step_px), dtype=xp.float32
    )
    ph_conj = phase_shifts(lev.kx, lev.ky, shifts, settings.box).conj()  # (S, m)
    n, m = lev.y.shape
    n_s, n_r = shifts.shape[0], rots.shape[0]
    n_c = min(settings.n_candidates, n_r)
    k_classes = len(grids)
    out_idx = np.zeros((n, k_classes, n_c), dtype=np.int64)
    out_shift = np.zeros((n, k_classes, n_c, 2), dtype=np.float32)
    out_ll = np.zeros((n, k_classes, n_c), dtype=np.float32)
    out_lse = np.zeros((n, k_classes), dtype=np.float64)
    for k, grid in enumerate(grids):
        a = project(grid, rots, lev.kx, lev.ky, settings.pad)  # (R, m)
        a_ri = split_real_imag(a, xp).T.copy()  # (2m, R)
        a_pow = (xp.abs(a) ** 2).T.copy()  # (m, R)
        for b0 in range(0, n, settings.batch_size):
            b1 = min(b0 + settings.batch_size, n)
            nb = b1 - b0
            x = (lev.y[b0:b1, None, :] * ph_conj[None]) * lev.ctf_w[b0:b1, None, :]
            x_ri = split_real_imag(x, xp).reshape(nb * n_s, 2 * m)
            if not settings.per_particle_scale:
                x_ri *= 2.0  # the factor 2 of the cross term, on the small operand
            c2w = lev.ctf2_w[b0:b1]
            if nb < settings.batch_size:
                # GEMMs of one fixed shape: a particle's numbers then do not depend on
                # which other particles share its batch (results independent of sharding)
                x_ri = xp.concatenate(
                    [x_ri, xp.zeros(((settings.batch_size - nb) * n_s, 2 * m), x_ri.dtype)]
                )
                c2w = xp.concatenate([c2w, xp.zeros((settings.batch_size - nb, m), c2w.dtype)])
            r_idx, s_idx, top_ll, mx, total = reduce_coarse(
                x_ri @ a_ri, c2w @ a_pow, nb, n_s, n_c, settings.per_particle_scale, xp
            )  # the (2x) cross and the norm terms
            out_idx[b0:b1, k] = _host(r_idx)
            out_shift[b0:b1, k] = _host(shifts[s_idx])
            # evidence: log-mean-exp over every (shift, rotation)
            lse = mx.astype(xp.float64) + xp.log(total)
            out_lse[b0:b1, k] = _host(lse - lev.y_norm[b0:b1] - np.log(n_s * n_r))
            out_ll[b0:b1, k] = _host(top_ll - lev.y_norm[b0:b1, None])
    return out_idx, out_shift, out_ll, out_lse


def _host(a):
    return to_host(a)


def local_search(
    spectra, ctf_params, sigma2, grid, rots, shifts, settings: SearchSettings, level: int,
    lev: FrequencyLevel | None = None,
):  # fmt: skip
    """One local refinement level around candidate poses for one class.

    rots (n, C, 3, 3), shifts (n, C, 2) pixels. Angular step coarse/2^level,
    shift step shift_step/2^level. Returns the best (rot (n,3,3), shift (n,2)),
    the log-sum-exp score (n,), the best log-likelihood (n,) and the best pose's
    probability within the local set (n,), and the per-particle scale at the best
    pose (n,) (ones unless ``settings.per_particle_scale``), and the significant
    poses (:func:`significant_poses`): rotations (n, P, 3, 3), shifts (n, P, 2) and
    weights (n, P). ``lev``: the particles' :class:`FrequencyLevel` at this level's
    radius when the caller has it already (the same for every class).
    """
    xp = get_xp(spectra)
    step = settings.coarse_step_deg / 2**level
    radius = settings.radius_for_step(step)
    if lev is None:
        lev = FrequencyLevel(spectra, ctf_params, sigma2, settings, radius)
    # rotations composed in float64: the chosen pose then does not depend on how
    # numpy's SIMD loops round a product at a given memory position
    pert = xp.asarray(perturbations(step, settings.local_points), dtype=xp.float64)  # (P, 3, 3)
    n_p = pert.shape[0]
    offs = xp.asarray(local_shift_offsets(settings.shift_step_px / 2**level), dtype=xp.float32)
    ph_off_conj = phase_shifts(lev.kx, lev.ky, offs, settings.box).conj()  # (9, m)
    yc = lev.y * lev.ctf_w  # Y C / sigma2
    n, n_c = rots.shape[:2]
    m = lev.y.shape[1]
    best_rot = np.zeros((n, 3, 3), dtype=np.float64)
    best_shift = np.zeros((n, 2), dtype=np.float32)
    score = np.zeros(n, dtype=np.float64)
    best_ll = np.zeros(n, dtype=np.float64)
    peak = np.zeros(n, dtype=np.float64)
    scale = np.ones(n, dtype=np.float64)
    n_sig = max(1, min(settings.max_significant, n_c * 9 * n_p))
    sig_rot = np.zeros((n, n_sig, 3, 3), dtype=np.float64)
    sig_shift = np.zeros((n, n_sig, 2), dtype=np.float32)
    sig_w = np.zeros((n, n_sig), dtype=np.float64)
    rots = xp.asarray(rots, dtype=xp.float64)
    shifts = xp.asarray(shifts, dtype=xp.float32)
    batch = max(1, settings.batch_size // 2)
    for b0 in range(0, n, batch):
        b1 = min(b0 + batch, n)
        nb = b1 - b0
        cand = xp.matmul(pert[None, None], rots[b0:b1, :, None])  # (b, C, P, 3, 3)
        sh = shifts[b0:b1, :, None, :] + offs[None, None]  # (b, C, 9, 2)
        # phase of (candidate shift + offset) = phase(candidate) x phase(offset): one
        # cos/sin per candidate and frequency instead of nine
        ph_c = phase_shifts(lev.kx, lev.ky, shifts[b0:b1].reshape(-1, 2), settings.box).conj()
        yc_c = yc[b0:b1, None, :] * ph_c.reshape(nb, n_c, m)  # (b, C, m)
        # cross (b, C, 9, P) and norm (b, C, P) terms of the candidates' slices, for the
        # transforms yc_c ph_off_conj (b, C, 9, m)
        cross, norm = slice_scores(
            grid, cand, lev.kx, lev.ky, yc_c, lev.ctf2_w[b0:b1], settings.pad, ph=ph_off_conj
        )
        ll = loglik(cross, norm[:, :, None, :], settings.per_particle_scale, xp)  # (b, C, 9, P)
        flat = ll.reshape(nb, -1).astype(xp.float64)
        mx = flat.max(axis=1)
        lse = mx + xp.log(xp.exp(flat - mx[:, None]).sum(axis=1))
        arg_best = flat.argmax(axis=1)
        c_i = arg_best // (9 * n_p)
        u_i = (arg_best // n_p) % 9
        j_i = arg_best % n_p
        bi = xp.arange(nb)
        best_rot[b0:b1] = _host(cand[bi, c_i, j_i])
        best_shift[b0:b1] = _host(sh[bi, c_i, u_i])
        if settings.per_particle_scale:
            cr = cross.reshape(nb, -1)[bi, arg_best]
            nm = xp.broadcast_to(norm[:, :, None, :], (nb, n_c, 9, n_p)).reshape(nb, -1)[
                bi, arg_best
            ]
            scale[b0:b1] = _host(xp.maximum(cr, 0) / xp.maximum(nm, 1e-30))
        top, w_top = significant_poses(flat, lse, n_sig, settings.significant_mass)
        c_t, u_t, j_t = top // (9 * n_p), (top // n_p) % 9, top % n_p
        sig_rot[b0:b1] = _host(cand[bi[:, None], c_t, j_t])
        sig_shift[b0:b1] = _host(sh[bi[:, None], c_t, u_t])
        sig_w[b0:b1] = _host(w_top)
        yn = lev.y_norm[b0:b1].astype(xp.float64)
        score[b0:b1] = _host(lse - yn)
        best_ll[b0:b1] = _host(mx - yn)
        peak[b0:b1] = _host(xp.exp(mx - lse))
    return best_rot, best_shift, score, best_ll, peak, scale, (sig_rot, sig_shift, sig_w)


def significant_poses(ll, lse, n_max: int, mass: float):
    """The most probable poses of each particle and their renormalised weights.

    ll (b, N) log-likelihoods of N poses, lse (b,) their log-sum-exp. Returns
    indices (b, n_max) into N, best first, and weights (b, n_max): the pose
    posterior exp(ll - lse) of the poses needed for the cumulative posterior to
    reach ``mass`` (at most ``n_max``), renormalised to sum 1; the rest zero.
    Only n_max entries per particle are sorted (argpartition first).
    """
    xp = get_xp(ll)
    n_max = min(n_max, ll.shape[1])
    if n_max < ll.shape[1]:
        part = xp.argpartition(-ll, n_max - 1, axis=1)[:, :n_max]
    else:
        part = xp.broadcast_to(xp.arange(n_max), ll.shape).copy()
    v = xp.take_along_axis(ll, part, axis=1)
    order = xp.argsort(-v, axis=1, kind="stable")
    idx = xp.take_along_axis(part, order, axis=1)
    w = xp.exp(xp.take_along_axis(v, order, axis=1) - lse[:, None])
    before = xp.cumsum(w, axis=1) - w  # mass of the better poses
    w = xp.where(before < mass, w, 0.0)  # keep a pose while the mass so far is short
    w /= w.sum(axis=1, keepdims=True)
    return idx, w


def search_poses(
    spectra, ctf_params, sigma2, grids, rots, settings: SearchSettings, refine=None
) -> PoseResult:
    """Coarse global search then ``settings.n_levels`` local levels, for every class.

    spectra (n, D, D//2+1) complex64 (device arrays), ctf_params (n, 8),
    sigma2 (D//2+1,) noise power per shell (or (n, D//2+1): per particle), grids: K reference grids, rots (R, 3, 3).
    refine: optional callable taking the coarse evidence (n, K) and returning a
    boolean (n, K) mask of the (particle, class) pairs worth refining locally (e.g.
    those with a non-negligible class posterior); the others keep their best
    coarse pose (score and best_ll from the coarse level, pose_peak NaN).
    """
    xp = get_xp(spectra)
    n = spectra.shape[0]
    k_classes = len(grids)
    rots_x = xp.asarray(rots, dtype=xp.float32)
    idx, sh, ll, evidence = coarse_search(spectra, ctf_params, sigma2, grids, rots_x, settings)
    n_shifts = len(shift_grid(settings.shift_range_px, settings.shift_step_px))
    rots_h = np.asarray(_host(rots_x))
    log_cells = np.log(n_shifts * len(rots_h))  # the coarse grid's poses
    res = PoseResult(
        rots=rots_h[idx[:, :, 0]].astype(np.float64),
        shifts=sh[:, :, 0].astype(np.float32),
        score=ll[:, :, 0].astype(np.float64),
        best_ll=ll[:, :, 0].astype(np.float64),
        pose_peak=np.full((n, k_classes), np.nan),
        coarse_evidence=evidence,
        scale=np.ones((n, k_classes)),
        # ll and evidence both without the particle's norm; the evidence is a log mean
        coarse_peak=np.minimum(np.exp(ll[:, :, 0] - evidence - log_cells), 1.0),
    )
    _best_as_significant(res, settings)
    res.fine_evidence = evidence.copy()
    if settings.n_levels == 0:
        res.pose_peak[:] = 1.0
        return res
    todo = np.ones((n, k_classes), bool) if refine is None else np.asarray(refine(evidence), bool)
    levels = LevelCache(spectra, ctf_params, sigma2, settings)
    for k, grid in enumerate(grids):
        rows = np.flatnonzero(todo[:, k])
        if len(rows) == 0:
            continue
        sub_spectra = spectra[xp.asarray(rows)] if len(rows) < n else spectra
        sub_ctf = ctf_params[xp.asarray(rows)] if len(rows) < n else ctf_params
        sub_s2 = sigma2[xp.asarray(rows)] if sigma2.ndim == 2 and len(rows) < n else sigma2
        r, s, score, best, peak, a, sig = _refine_locally(
            sub_spectra, sub_ctf, sub_s2, grid, rots_h[idx[rows, k]], sh[rows, k], settings,
            levels.rows(None if len(rows) == n else rows),
        )  # fmt: skip
        res.rots[rows, k], res.shifts[rows, k] = r, s
        res.score[rows, k], res.best_ll[rows, k], res.pose_peak[rows, k] = score, best, peak
        res.scale[rows, k] = a
        _set_significant(res, rows, k, sig)
        res.fine_evidence[rows, k] = score + _fine_volume_term(settings, n_shifts)
    _level_unrefined(res, todo)
    return res


def _level_unrefined(res: PoseResult, refined: np.ndarray) -> None:
    """Put the fine evidence of pairs left unrefined on their particle's fine scale.

    The final level integrates more frequencies than the coarse search, so the two
    evidences differ per particle by a large offset (its extra noise terms): an
    unrefined pair keeps its coarse evidence moved by the offset of the particle's
    best refined class (its coarse weight relative to that class is kept)."""
    ev_c, ev_f = res.coarse_evidence, res.fine_evidence
    masked = np.where(refined, ev_c, -np.inf)
    best = masked.argmax(axis=1)
    rows = np.arange(len(best))
    has = refined.any(axis=1)
    offset = np.where(has, ev_f[rows, best] - ev_c[rows, best], 0.0)
    res.fine_evidence = np.where(refined, ev_f, ev_c + offset[:, None])


def _fine_volume_term(settings: SearchSettings, n_coarse_shifts: int) -> float:
    """log(sample volume of the final level / whole pose volume): added to the final
    level's log-sum-exp it estimates the log of the mean likelihood over all poses,
    the quantity ``coarse_search`` returns as the evidence (rotations: the Haar
    measure, d^3 of the rotation vector near a pose, 8 pi^2 in all; shifts: the
    coarse grid's area)."""
    lv = settings.n_levels
    step = np.deg2rad(settings.coarse_step_deg / 2**lv)
    ds = settings.shift_step_px / 2**lv
    area = n_coarse_shifts * settings.shift_step_px**2
    return float(3 * np.log(step) - np.log(8 * np.pi**2) + np.log(ds * ds / area))


def _best_as_significant(res: PoseResult, settings: SearchSettings) -> None:
    """Significant-pose arrays holding each pair's best pose with weight 1."""
    n, k_classes = res.score.shape
    p = max(1, settings.max_significant)
    res.sig_rots = np.zeros((n, k_classes, p, 3, 3))
    res.sig_rots[:, :, 0] = res.rots
    res.sig_shifts = np.zeros((n, k_classes, p, 2), np.float32)
    res.sig_shifts[:, :, 0] = res.shifts
    res.sig_weights = np.zeros((n, k_classes, p))
    res.sig_weights[:, :, 0] = 1.0


def _set_significant(res: PoseResult, rows, k: int, sig) -> None:
    r, s, w = sig
    p = r.shape[1]
    res.sig_rots[rows, k] = 0.0
    res.sig_shifts[rows, k] = 0.0
    res.sig_weights[rows, k] = 0.0
    res.sig_rots[rows, k, :p], res.sig_shifts[rows, k, :p], res.sig_weights[rows, k, :p] = r, s, w


def _refine_locally(
    spectra, ctf_params, sigma2, grid, cand_rots, cand_sh, settings: SearchSettings, level_at=None
):
    """``settings.n_levels`` local levels from candidates (n, C, 3, 3) and (n, C, 2), each
    level starting from the previous one's best pose; returns the last level's
    :func:`local_search` results. ``level_at``: radius -> the particles'
    :class:`FrequencyLevel` (shared between classes), or None to build them here."""
    for level in range(1, settings.n_levels + 1):
        radius = settings.radius_for_step(settings.coarse_step_deg / 2**level)
        lev = None if level_at is None else level_at(radius)
        out = local_search(
            spectra, ctf_params, sigma2, grid, cand_rots, cand_sh, settings, level, lev
        )
        cand_rots, cand_sh = out[0][:, None], out[1][:, None]
    return out


def search_around_given_poses(
    spectra, ctf_params, sigma2, grids, rots, shifts, settings: SearchSettings, refine: bool
) -> PoseResult:
    """Poses given with the particles (e.g. from a consensus refinement or a tilt
    series): evaluate every class at the given pose (``refine=False``) or refine it
    locally (``settings.n_levels`` levels starting at half the coarse step).

    rots (n, 3, 3), shifts (n, 2) in pixels (content moved by +shift). The class
    evidence is the log-likelihood at the given pose, or the log-sum-exp over the
    last local level when refining.
    """
    xp = get_xp(spectra)
    n, k_classes = spectra.shape[0], len(grids)
    res = PoseResult(
        rots=np.repeat(np.asarray(rots, np.float64)[:, None], k_classes, axis=1),
        shifts=np.repeat(np.asarray(shifts, np.float32)[:, None], k_classes, axis=1),
        score=np.zeros((n, k_classes)),
        best_ll=np.zeros((n, k_classes)),
        pose_peak=np.ones((n, k_classes)),
        coarse_evidence=np.zeros((n, k_classes)),
        coarse_peak=np.ones((n, k_classes)),
        scale=np.ones((n, k_classes)),
    )
    _best_as_significant(res, settings)
    lev = FrequencyLevel(spectra, ctf_params, sigma2, settings, settings.res_limit_px)
    r_x = xp.asarray(rots, dtype=xp.float32)
    ph = phase_shifts(lev.kx, lev.ky, xp.asarray(shifts, dtype=xp.float32), settings.box)
    x = lev.y * ph.conj() * lev.ctf_w  # (n, m)
    levels = LevelCache(spectra, ctf_params, sigma2, settings)
    for k, grid in enumerate(grids):
        a = project(grid, r_x, lev.kx, lev.ky, settings.pad)  # (n, m)
        cross = (x.conj() * a).real.sum(axis=1)
        norm = (lev.ctf2_w * xp.abs(a) ** 2).sum(axis=1)
        if settings.per_particle_scale:
            res.scale[:, k] = _host(xp.maximum(cross, 0) / xp.maximum(norm, 1e-30))
            ll = loglik(cross, norm, True, xp)
        else:
            ll = 2.0 * cross - norm
        ll = _host(ll - lev.y_norm).astype(np.float64)
        res.score[:, k] = res.best_ll[:, k] = res.coarse_evidence[:, k] = ll
        if not refine or settings.n_levels == 0:
            continue
        r, s, score, best, peak, a_k, sig = _refine_locally(
            spectra, ctf_params, sigma2, grid,
            np.asarray(rots, np.float64)[:, None], np.asarray(shifts, np.float32)[:, None], settings,
            levels.get,
        )  # fmt: skip
        _set_significant(res, np.arange(n), k, sig)
        res.rots[:, k], res.shifts[:, k] = r, s
        res.score[:, k], res.best_ll[:, k], res.pose_peak[:, k] = score, best, peak
        res.coarse_evidence[:, k] = score
        res.scale[:, k] = a_k
    res.fine_evidence = res.coarse_evidence
    return res
