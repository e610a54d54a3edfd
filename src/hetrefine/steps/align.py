"""Step of rule `align`: classify and align one shard against the previous
iteration's references; write its assignments and its backprojection sums per
class and half-set (and its residual noise power)."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from hetrefine import convergence
from hetrefine.alignment import (
    SearchSettings,
    coarse_search,
    search_around_given_poses,
    search_poses,
)
from hetrefine.backend import get_xp, select_device
from hetrefine.backprojection import (
    SumsGrid,
    backprojection_radius,
    centred_images,
    marginalised_class_sums,
)
from hetrefine.classification import (
    SELF_EVIDENCE_STATS,
    anneal_similarity,
    class_posteriors,
    fit_score,
    gated_class_evidence,
    online_em_selection,
    random_assignment,
    self_evidence_stats,
    without_self_evidence,
)
from hetrefine.ctf import compute_ctf
from hetrefine.focus import noise_reference, reference_masks, search_references
from hetrefine.fourier import rfft2_centered
from hetrefine.io import run_files
from hetrefine.io.mrc import read_volume
from hetrefine.likelihood import fit_terms_at_poses
from hetrefine.noise import group_residual_power, particle_sigma2, residual_power
from hetrefine.plan import CHUNK_PARTICLES
from hetrefine.projection import PAD, prepare_reference, project
from hetrefine.rotations import euler_to_matrix, matrix_to_euler
from hetrefine.sampling import rotation_grid
from hetrefine.starts import fit_to_group_maps, split_same_map_groups
from hetrefine.validation import check_input_poses

log = logging.getLogger("hetrefine")


MIN_BACKPROJECTED_POSTERIOR = 1e-3
"""(particle, class) pairs below this posterior are neither refined locally nor backprojected."""


class _Posteriors:
    """Class posteriors of one half-set's particles at this iteration."""

    def __init__(self, settings: Mapping, prior, iteration: int, index, same_maps: list, cuts=None):
        self.beta = 1.0 - anneal_similarity(
            iteration,
            float(settings["class_similarity"]),
            int(settings["class_similarity_anneal_iterations"]),
        )
        self.random = iteration <= int(settings["random_assignment_iterations"])
        # references that are one map (init_references found them): split at random
        self.same_maps = same_maps if iteration == 1 else []
        self.cuts = cuts or None  # by their fit to the map (starts.same_map_fit_cuts)
        self.hard = settings["classification"] == "hard"
        self.seed, self.iteration, self.prior, self.index = (
            int(settings["seed"]),
            iteration,
            prior,
            index,
        )

    def __call__(self, evidence, fit=None):
        if self.random:
            return random_assignment(self.index, evidence.shape[1], self.iteration, self.seed)
        post = class_posteriors(evidence, self.prior, self.beta, self.hard)
        if self.same_maps and (fit is not None or not self.cuts):
            post = split_same_map_groups(
                post, self.same_maps, self.index, self.seed, fit, self.cuts
            )
        return post


#: The particles also scored against the other half-set's maps, to measure the evidence a
#: particle gains from its own image in its reference: whole blocks of SELF_BLOCK
#: consecutive particles (by index; the chunks preprocess writes by default), every
#: SELF_SAMPLE-th block, in larger data sets every n-th, for about SELF_SAMPLE_TARGET
#: particles in all (the estimate is pooled over the whole data set,
#: ``steps.reconstruct``). Whole blocks, not every n-th particle: the cost is mostly the
#: other half-set's projections at every coarse rotation, paid once per chunk that holds
#: any sample particle, so a chunk outside the sample pays nothing.
SELF_SAMPLE = 4
SELF_SAMPLE_TARGET = 2000
SELF_BLOCK = CHUNK_PARTICLES


def self_sample(index: np.ndarray, n_particles: int) -> np.ndarray:
    """Boolean (n,): which of the particles ``index`` are in the self-evidence sample
    (block ``index // SELF_BLOCK`` a multiple of the block step; by index only, so the
    same particles whatever the sharding)."""
    n_blocks = -(-n_particles // SELF_BLOCK)
    step = max(SELF_SAMPLE, -(-n_blocks * SELF_BLOCK // SELF_SAMPLE_TARGET))
    return (np.asarray(index) // SELF_BLOCK) % step == 0


class AlignJob:
    """What one align job reads and prepares once, whatever its number of chunks: the
    model, the references and masks, the search settings, the rotation grid, the sums
    grid and, per half-set, the references' padded Fourier grids (prepared on first use,
    then reused by every chunk: ``projection.prepare_reference`` costs 0.29 s per class
    and half-set at box 128). Holds no per-particle state; a chunk's results do not depend
    on whether its job was built for it alone or shared (``tests/test_align_job.py``).

    Memory: the K grids of both half-sets stay prepared, complex64 cubes of side
    2 ceil(2 r) + 5 for the sums grid's radius r (at most (2D+5)^3)."""

    def __init__(self, refs: str, model: str, mask: str, focus_mask: str, settings: Mapping,
                 device: str = "auto"):  # fmt: skip
        self.xp = select_device(device)
        self.settings = settings
        self.mdl = mdl = run_files.read_model(model)
        self.box, self.px = int(mdl["box"]), float(mdl["pixel_size"])
        self.maps = run_files.read_references(refs)["maps"]
        self.k_classes = self.maps.shape[0]
        self.mask_vol, _ = read_volume(mask)
        m = settings["mask"]
        focus_vol = read_volume(focus_mask)[0] if m["file"] or m.get("solvent") else None
        self.masks = reference_masks(self.mask_vol, focus_vol, settings["mask"])
        self.search = SearchSettings.from_config(
            self.box, self.px, float(mdl["res_limit_px"]), settings
        )
        self.rots = rotation_grid(
            float(settings["coarse_angle_step_deg"]), str(settings["symmetry"])
        )
        self.grid = SumsGrid.create(
            self.box, backprojection_radius(self.search.res_limit_px, self.box), self.xp
        )
        # the references' grids hold what the search and the sums grid read, not Nyquist
        # (box 128: 47 instead of 136 MiB per grid in early iterations)
        self.grid_radius = max(self.grid.radius, self.search.res_limit_px)
        self.prior = np.asarray(mdl["class_fractions"], dtype=np.float64)
        # self-evidence measured and taken out (pose search from scratch, several classes)
        self.self_evidence = bool(
            settings["self_evidence_correction"]
            and str(settings["input_poses"]) == "ignore"
            and self.k_classes > 1
        )
        self._grids: dict[int, list] = {}
        self._noise: dict[tuple[int, int], object] = {}

    def grids(self, h: int) -> list:
        """Half-set ``h``'s K search references as padded Fourier grids (masked as
        :mod:`hetrefine.focus` says)."""
        if h not in self._grids:
            self._grids[h] = [
                prepare_reference(self.xp.asarray(ref), PAD, self.grid_radius)
                for ref in search_references(self.maps[:, h], self.masks, self.prior)
            ]
        return self._grids[h]

    def noise_grid(self, k: int, h: int):
        """The grid the residual noise power of class ``k``, half-set ``h`` is measured
        against (the spherical mask's when a focused mask is set, else the search's)."""
        if (k, h) not in self._noise:
            ref = noise_reference(self.maps[k, h], self.masks)
            self._noise[k, h] = (
                self.grids(h)[k]
                if ref is None
                else prepare_reference(self.xp.asarray(ref), PAD, self.grid_radius)
            )
        return self._noise[k, h]


def _self_evidence_stats(own, used, spectra, ctf_x, sigma2, job: AlignJob, h, post, evidence_of):
    """This half-set's sufficient statistics (K, 5) of the self-evidence slope
    (``classification.self_evidence_stats``) over its sample particles (every
    :func:`self_sample`), scored also against half-set 1 - h's (search) references:
    d = ``own`` evidence minus the other's, against the posteriors from the ``used``
    (corrected) evidence. ``evidence_of``: None for the coarse evidence (the other half
    on the coarse grid alone), else (PoseResult, considered) -> evidence as ``own`` was
    taken (the sample searched in full). ``sigma2``: per shell, or (n, shells)."""
    xp = get_xp(spectra)
    sample = np.flatnonzero(self_sample(post.index, int(job.mdl["n_particles"])))
    if len(sample) == 0:
        return np.zeros((own.shape[1], SELF_EVIDENCE_STATS))
    sx = xp.asarray(sample)
    s2 = sigma2[sx] if sigma2.ndim == 2 else sigma2  # per particle with optics groups
    rots = xp.asarray(job.rots, xp.float32)
    other = job.grids(1 - h)
    if evidence_of is None:
        ev_o = coarse_search(spectra[sx], ctf_x[sx], s2, other, rots, job.search)[3]
    else:

        def considered(ev):
            return class_posteriors(ev, post.prior, post.beta) > MIN_BACKPROJECTED_POSTERIOR

        res_o = search_poses(spectra[sx], ctf_x[sx], s2, other, rots, job.search, considered)
        ev_o = evidence_of(res_o, considered)
    d = np.asarray(own, np.float64)[sample] - np.asarray(ev_o, np.float64)
    return self_evidence_stats(d, class_posteriors(used, post.prior, post.beta)[sample])


def class_evidence(res, settings: Mapping, considered, resolved=None) -> np.ndarray:
    """The evidence (n, K) a half-set's class posteriors come from, as config
    ``class_evidence`` says: ``res.coarse_evidence`` itself (coarse), the final local
    level's (fine), or between them by how peaked each particle's coarse pose posterior
    is (gated: ``classification.gated_class_evidence`` with ``class_evidence_full_share``).
    ``considered``: coarse evidence -> (n, K) the pairs refined locally; ``resolved``
    (K,) bool: the classes whose maps resolve the final level's extra shells
    (:func:`resolved_classes`)."""
    mode = str(settings["class_evidence"])
    if mode == "coarse" or res.fine_evidence is None:
        return res.coarse_evidence
    if mode == "fine":
        return res.fine_evidence
    ev, w = gated_class_evidence(
        res.coarse_evidence, res.fine_evidence, res.coarse_peak,
        considered(res.coarse_evidence), float(settings["class_evidence_full_share"]),
        resolved,
    )  # fmt: skip
    if len(w):
        log.info(
            "class evidence gated: weight of the fine level mean %.2f, quartiles %s",
            float(w.mean()), np.round(np.quantile(w, [0.25, 0.5, 0.75]), 2).tolist(),
        )  # fmt: skip
    return ev


def resolved_classes(mdl: Mapping, search: SearchSettings) -> np.ndarray | None:
    """(K,) bool: the classes whose half-set resolution (``model.json``
    ``resolution_A``, iteration i-1's) is at least one shell beyond the coarse search's
    radius, i.e. whose maps carry signal in the shells the final local level adds (none
    where the coarse radius is the alignment limit, as in iteration 1); None when the
    model has none."""
    res_a = mdl.get("resolution_A")
    if res_a is None:
        return None
    res_px = search.box * search.pixel_size / np.asarray(res_a, np.float64)
    return res_px >= search.radius_for_step(search.coarse_step_deg) + 1.0


def align_shard(
    shard: str,
    refs: str,
    model: str,
    mask: str,
    focus_mask: str,
    iteration: int,
    out_assign: str,
    out_sums: str | run_files.SumsTotal,
    settings: Mapping,
    device: str = "auto",
    job: AlignJob | None = None,
) -> None:
    """Align shard ``shard`` against ``refs`` (iteration ``iteration`` - 1's); its sums
    into the file ``out_sums``, or added to ``out_sums`` when that is a running sum.

    ``focus_mask``: the make_mask step's focused mask, used as ``mask.apply_to`` says
    when ``mask.file`` is set (:mod:`hetrefine.focus`). ``job``: the :class:`AlignJob`
    of ``refs``, ``model``, masks and settings, when the caller aligns several chunks
    (built here otherwise)."""
    t0 = time.time()
    if job is None:
        job = AlignJob(refs, model, mask, focus_mask, settings, device)
    xp, mdl, box, px = job.xp, job.mdl, job.box, job.px
    n_total = int(mdl["n_particles"])
    k_classes, search, rots, grid = job.k_classes, job.search, job.rots, job.grid
    sh = run_files.read_shard(shard)
    index, half = sh["index"], sh["half"].astype(int)

    input_poses = str(settings["input_poses"])
    check_input_poses(input_poses, "euler" in sh)  # preprocess keeps poses when the file has them
    sel = online_em_selection(
        index, n_total, k_classes, iteration,
        int(settings["online_em_iterations"]), int(settings["batch_size_per_class"]), int(settings["seed"]),
    )  # fmt: skip
    if input_poses != "ignore":
        given_euler, given_origin = sh["euler"][sel], sh["origin_A"][sel]
    index, half = index[sel], half[sel]
    images, ctf = sh["images"][sel], sh["ctf"][sel]
    n = len(index)
    # the noise spectrum per particle (its optics group's) or one for all: (n, S) or (S,)
    group = sh["group"][sel].astype(np.int64) if "sigma2_groups" in mdl else None
    sigma2 = particle_sigma2(mdl, group)
    n_groups = len(mdl["sigma2_groups"]) if group is not None else 0
    n_sh = box // 2 + 1
    # sums kept on the Hermitian half ball, per class and half-set
    num = np.zeros((k_classes, 2, grid.n_packed), np.complex64)
    wgt = np.zeros((k_classes, 2, grid.n_packed), np.float32)
    posterior = np.zeros((n, k_classes), np.float32)
    euler = np.zeros((n, k_classes, 3), np.float32)
    shift_A = np.zeros((n, k_classes, 2), np.float32)
    loglik = np.zeros((n, k_classes), np.float32)
    peak = np.zeros((n, k_classes), np.float32)
    scale = np.ones((n, k_classes), np.float32)
    fit = np.full(n, np.nan, np.float32)
    noise_pow = np.zeros(n_sh)
    noise_cnt = np.zeros(n_sh)
    noise_pow_g, noise_cnt_g = np.zeros((n_groups, n_sh)), np.zeros((n_groups, n_sh))
    prior = job.prior
    shells_f = grid.shells()
    inv_s2_f = xp.asarray(1.0 / sigma2)[..., shells_f].astype(xp.float32)
    freq = 1.0 / (box * px)
    # the self-evidence (classification.self_evidence): its statistics measured on every
    # chunk, added over the data set by reconstruct, whose estimate (model.json
    # `self_evidence`, from iteration i-1) is taken out of the class evidence here
    measure_self = job.self_evidence
    self_ev = mdl.get("self_evidence") if measure_self else None
    se_stats = np.zeros((2, k_classes, SELF_EVIDENCE_STATS))
    resolved = resolved_classes(mdl, search)
    if self_ev is not None:
        log.info("self-evidence taken out per class: %s nats", np.round(self_ev, 2).tolist())
    for h in (0, 1):
        rows = np.flatnonzero(half == h)
        if len(rows) == 0:
            continue
        grids = job.grids(h)
        spectra = rfft2_centered(xp.asarray(images[rows]))
        ctf_x = xp.asarray(ctf[rows])
        s2_x = xp.asarray(sigma2[rows] if sigma2.ndim == 2 else sigma2)
        posteriors = _Posteriors(
            settings,
            prior,
            iteration,
            index[rows],
            mdl.get("same_map_groups", []),
            mdl.get("same_map_fit_cuts"),
        )

        def worth_refining(evidence, posteriors=posteriors):
            # the only pairs that are backprojected
            return posteriors(evidence) > MIN_BACKPROJECTED_POSTERIOR

        if input_poses == "ignore":
            res = search_poses(spectra, ctf_x, s2_x, grids, rots, search, worth_refining)
        else:
            given_r = euler_to_matrix(given_euler[rows])
            given_t = -given_origin[rows] / px  # RELION origin -> content shift in pixels
            res = search_around_given_poses(
                spectra, ctf_x, s2_x, grids, given_r, given_t, search,
                refine=input_poses == "local",
            )  # fmt: skip
        # the class evidence: the coarse grid's, the final level's or between them
        raw = res.coarse_evidence
        evidence = own = class_evidence(res, settings, worth_refining, resolved)
        # not in iteration 1: reconstruct has no class change to guard the estimate with
        if measure_self and not posteriors.random and iteration > 1:
            if self_ev is not None and not posteriors.same_maps:  # iteration i-1's estimate
                res.coarse_evidence = without_self_evidence(raw, self_ev, prior, posteriors.beta)
                evidence = (
                    res.coarse_evidence
                    if own is raw
                    else without_self_evidence(own, self_ev, prior, posteriors.beta)
                )
            # measured on the evidence the posteriors come from, the other half's alike
            se_stats[h] += _self_evidence_stats(
                own, evidence, spectra, ctf_x, s2_x, job, h, posteriors,
                None if own is raw else (lambda r, c: class_evidence(r, settings, c, resolved)),
            )  # fmt: skip
        fit_g = None
        if posteriors.same_maps and posteriors.cuts:
            fit_g = fit_to_group_maps(
                spectra, ctf_x, s2_x, search, grids, res, posteriors.same_maps
            )
        post = posteriors(evidence, fit_g)
        log.info(
            "half-set %s: %d particles aligned (%d of %d in this shard, %.1f s)",
            "AB"[h], len(rows), int((half <= h).sum()), n, time.time() - t0,
        )  # fmt: skip
        posterior[rows] = post
        euler[rows] = matrix_to_euler(res.rots)
        shift_A[rows] = -res.shifts * px  # RELION origin: the image moved by +origin is centred
        loglik[rows] = res.best_ll
        peak[rows] = res.pose_peak
        scale[rows] = res.scale
        best = post.argmax(axis=1)
        rows_n = np.arange(len(rows))  # the fit score at the chosen class's best pose,
        # against the other half-set's map, which does not hold the particle's own image
        fit[rows] = fit_score(*fit_terms_at_poses(
            spectra, ctf_x, s2_x, search, job.grids(1 - h), best,
            res.rots[rows_n, best], res.shifts[rows_n, best],
        ))  # fmt: skip
        # backprojection and residual noise power at full resolution
        y = spectra.reshape(len(rows), -1)[:, grid.flat]
        c = compute_ctf(ctf_x, grid.kx * freq, grid.ky * freq)
        for k in range(k_classes):
            w = post[:, k]
            use = np.flatnonzero(w > MIN_BACKPROJECTED_POSTERIOR)
            if len(use) == 0:
                continue
            use_x = xp.asarray(use)  # device index (CuPy wants its own arrays)
            r_k = xp.asarray(res.rots[use, k])
            ak = xp.asarray(res.scale[use, k].astype(np.float32))  # per-particle scale
            c_k = c[use_x]
            y_k = y[use_x]
            # each particle over its significant poses in this class (pose marginalisation)
            num[k, h], wgt[k, h] = marginalised_class_sums(
                y_k, c_k, grid, xp.asarray(w[use]), ak,
                inv_s2_f[xp.asarray(rows[use])] if group is not None else inv_s2_f,
                res.sig_rots[use, k], res.sig_shifts[use, k], res.sig_weights[use, k],
            )  # fmt: skip
            mine = np.flatnonzero(best[use] == k)
            if len(mine):  # the residual noise power at the best pose
                mx = xp.asarray(mine)
                y_c = centred_images(y_k[mx], xp.asarray(res.shifts[use[mine], k]), grid)
                ref = job.noise_grid(k, h)  # the spherical mask's, if different
                a = project(ref, r_k[mx], grid.kx, grid.ky, PAD)
                model_k = ak[mx][:, None] * c_k[mx] * a
                p, cnt = residual_power(y_c, model_k, shells_f, n_sh)
                noise_pow += p
                noise_cnt += cnt
                if group is not None:  # and per optics group
                    g_rows = group[rows[use[mine]]]
                    p, cnt = group_residual_power(y_c, model_k, shells_f, n_sh, g_rows, n_groups)
                    noise_pow_g += p
                    noise_cnt_g += cnt
    run_files.write_assignments(
        out_assign,
        index=index,
        half=half.astype(np.int8),
        posterior=posterior,
        euler=euler,
        shift=shift_A,
        loglik=loglik,
        pose_peak=peak,
        fit_score=fit,
        **({"scale": scale} if settings["per_particle_scale"] else {}),
        noise_power=noise_pow,
        noise_count=noise_cnt,
        **({"self_evidence_stats": se_stats} if measure_self else {}),
        **(
            {"noise_power_groups": noise_pow_g, "noise_count_groups": noise_cnt_g}
            if n_groups
            else {}
        ),
    )
    if isinstance(out_sums, run_files.SumsTotal):  # align_chunks: added up in memory
        out_sums.add(num, wgt, grid.size, shard)
    else:
        run_files.write_sums(out_sums, num, wgt, grid.size)
    log.info(
        "align iteration %d, %s: %d particles (%d of shard), classes %s, res limit %.1f A, %.1f s",
        iteration, Path(shard).name, n, len(sel),
        np.bincount(posterior.argmax(1), minlength=k_classes).tolist() if n else [],
        box * px / search.res_limit_px, time.time() - t0,
    )  # fmt: skip


def align_chunks(
    chunks: list[str],
    refs: str,
    model: str,
    mask: str,
    focus_mask: str,
    prev_assign: Sequence[str],
    iteration: int,
    out_assign: str,
    out_sums: str,
    settings: Mapping,
    device: str = "auto",
) -> None:
    """Align one shard, its preprocessed chunks one after another (:func:`align_shard`
    each, sharing one :class:`AlignJob`: references, grids and masks prepared once), so
    the job's memory follows a chunk, not the shard: one assignment file and one
    sums file for the whole shard (the sums added in double precision in memory, written
    once in single precision). After the run stopped, a pass-through of ``prev_assign``
    (the shard's previous assignments; :mod:`hetrefine.convergence`)."""
    if convergence.pass_through_align(model, list(prev_assign), out_assign, out_sums, iteration):
        return
    total = run_files.SumsTotal()
    job = AlignJob(refs, model, mask, focus_mask, settings, device)  # once for every chunk
    Path(out_assign).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=Path(out_assign).parent, prefix=".chunks-") as tmp:
        parts = []
        for c, chunk in enumerate(chunks):
            parts.append(f"{tmp}/assign_{c:05d}.npz")
            align_shard(
                chunk,
                refs,
                model,
                mask,
                focus_mask,
                iteration,
                parts[-1],
                total,
                settings,
                device,
                job,
            )
        run_files.write_assignments(out_assign, **run_files.merge_assignments(parts))
    total.write(out_sums)
