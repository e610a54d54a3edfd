"""Step of rule `reconstruct`: sum every shard's backprojections, make the half-maps per
class, their FSC and resolution, the noise spectrum and the class statistics.

One labelling of the classes across the half-sets. The two half-sets are refined
independently, so half B's class k need not hold the state of half A's class k (from a
random or one-map start they separate on their own, often with the labels swapped). Once
per iteration, from the summed sums, :func:`starts.half_set_label_match` pairs half B's
classes with half A's (on lightly regularised maps); half B's sums are put in that order
before anything else is made of them, so the FSC, the written references and every later
iteration use one labelling. The particles of half B carry the labels their align step
gave them (the previous references' classes); the permutation is written into
``model.json`` as ``half_b_order`` (half B's class k is the class ``order[k]`` its align
step wrote) and every reader of this iteration's assignments applies it
(``classification.relabel_half_b``): the class statistics and prior here, the changed
fraction of the next iteration, ``hard_sums``, ``write_classes`` and the plots. The
self-evidence statistics of half B are permuted the same way.

The self-evidence (``classification.self_evidence``: what a particle gains from its own
image in its class's reference) is estimated here once per iteration over the whole data
set, from the sufficient statistics every align chunk writes (``self_evidence_stats``,
per half-set and class), and written into ``model.json`` as ``self_evidence`` (nats per
class); the next iteration's align takes it out of the class evidence (a one-iteration
lag: none in iteration 1, nor while the assignments are random or one map is split, nor
while the half-sets do not yet hold the same classes, :data:`SELF_EVIDENCE_MAX_CHANGED`).
So the correction does not depend on how the particles were split into shards.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import numpy as np

from hetrefine import __version__, convergence
from hetrefine.classification import (
    changed_fraction,
    class_fractions,
    half_b_order,
    hard_classes,
    posterior_entropy,
    relabel_half_b,
    self_evidence_from_stats,
)
from hetrefine.fsc import resolution_angstrom, resolution_shell
from hetrefine.io import run_files
from hetrefine.io.mrc import read_volume
from hetrefine.junk import class_centres
from hetrefine.noise import updated_group_spectra, updated_spectrum
from hetrefine.projection import PAD
from hetrefine.reconstruction import add_centered, half_maps, unpack_sums, wiener_volume
from hetrefine.schedule import next_resolution_limit
from hetrefine.starts import half_set_label_match
from hetrefine.symmetry import symmetry_matrices

log = logging.getLogger("hetrefine")


#: Per-shard sums in an assignment file that reconstruct adds over the shards (those
#: present: the optics groups' and the self-evidence statistics are optional).
SUMMED_KEYS = (
    "noise_power", "noise_count", "noise_power_groups", "noise_count_groups",
    "self_evidence_stats",
)  # fmt: skip


def _gather(assign: list[str], order: np.ndarray | None = None) -> dict:
    """The shards' assignments, each file read once: ``posterior`` (half B's classes
    permuted by ``order``, :func:`classification.relabel_half_b`) and ``index``
    concatenated, ``fit_score`` concatenated when every shard holds it, the
    :data:`SUMMED_KEYS` present summed (absent: not in the dict)."""
    posts, idx, fits, sums = [], [], [], {}
    for p in sorted(assign):
        d = relabel_half_b(run_files.read_assignments(p), order)
        posts.append(d["posterior"])
        idx.append(d["index"])
        fits.append(d.get("fit_score"))
        for key in SUMMED_KEYS:
            if key in d:
                sums[key] = d[key] + sums.get(key, 0.0)
    if fits and all(f is not None for f in fits):
        sums["fit_score"] = np.concatenate(fits)
    return {"posterior": np.concatenate(posts), "index": np.concatenate(idx), **sums}


#: The self-evidence is measured between the half-sets, so only while they hold the same
#: classes: not while more than this share of the particles change class (the halves'
#: maps then differ by more than each particle's own image: from a one-map start the
#: slope read 7-13 nats while the classes formed, and taking that out flattened the
#: posteriors until half B's classes swapped), nor when half B's classes were permuted.
SELF_EVIDENCE_MAX_CHANGED = 0.05


def _self_evidence(se_stats, order: np.ndarray, changed: float | None) -> list[float] | None:
    """Per-class self-evidence (nats) over the whole data set from the shards' summed
    statistics (2, K, 5) (``classification.self_evidence_from_stats``); None when the
    shards measured none, or when the half-sets did not yet hold the same classes (the
    first iteration, more than :data:`SELF_EVIDENCE_MAX_CHANGED` of the particles changed
    class, or half B's classes were permuted, ``order``)."""
    if se_stats is None or changed is None or changed > SELF_EVIDENCE_MAX_CHANGED:
        return None
    if np.any(order != np.arange(len(order))):
        return None
    return self_evidence_from_stats(np.asarray(se_stats, np.float64)).tolist()


def match_half_sets(num, wgt, box: int, mask_vol, radius_px: float) -> np.ndarray:
    """``order`` (K,): half B's class that is half A's class k, from the Friedel-complete
    sums (K, 2, n, n, n) (:func:`starts.half_set_label_match` on their lightly regularised
    maps, low-passed to ``radius_px``, the limit this iteration aligned to, and masked)."""
    k_classes = num.shape[0]
    if k_classes < 2:
        return np.arange(k_classes)
    raw = np.stack([
        np.stack([wiener_volume(num[k, h], wgt[k, h], box, PAD, None) for h in (0, 1)])
        for k in range(k_classes)
    ])  # fmt: skip
    return half_set_label_match(raw, mask_vol, radius_px)


def reconstruct(
    assign: list[str],
    sums: list[str],
    prev_model: str,
    prev_refs: str,
    prev_assign: list[str],
    mask: str,
    iteration: int,
    out_refs: str,
    out_model: str,
    settings: Mapping,
) -> None:
    """Iteration ``iteration``'s references and statistics from its shards' files."""
    t0 = time.time()
    if convergence.pass_through_reconstruct(prev_model, prev_refs, out_refs, out_model, iteration):
        return
    mdl = run_files.read_model(prev_model)
    box, px = int(mdl["box"]), float(mdl["pixel_size"])
    mask_vol, _ = read_volume(mask)
    num_p, wgt_p, size = run_files.add_sums(sums)
    num, wgt = unpack_sums(num_p, wgt_p, size)
    decay = float(settings["online_em_decay"])
    prev = None
    if decay > 0 or not all(np.any(w) for w in wgt):
        prev = run_files.read_references(prev_refs)
    if decay > 0 and "num" in prev:
        num = add_centered(num, decay * prev["num"])
        wgt = add_centered(wgt, decay * prev["wgt"])
        log.info("online EM: previous sums added with decay %.2f", decay)
    k_classes = num.shape[0]
    order = match_half_sets(num, wgt, box, mask_vol, float(mdl["res_limit_px"]))
    if np.any(order != np.arange(k_classes)):
        log.info(
            "half-set B's classes %s read as classes %s (matched to half-set A's maps)",
            (order + 1).tolist(), list(range(1, k_classes + 1)),
        )  # fmt: skip
        num[:, 1], wgt[:, 1] = num[order, 1], wgt[order, 1]
    sym_mats = symmetry_matrices(str(settings["symmetry"]))
    maps = np.zeros((k_classes, 2, box, box, box), np.float32)
    curves, res_A, shells = [], [], []
    for k in range(k_classes):
        if not np.any(wgt[k]):
            log.warning("class %d received no particles; keeping its previous map", k + 1)
            maps[k] = prev["maps"][k]
            curves.append(np.zeros(box // 2 + 1))
            res_A.append(None)
            shells.append(0.0)
            continue
        maps[k], curve = half_maps(
            num[k], wgt[k], box, sym_mats, mask_vol, float(settings["tau2_fudge"])
        )
        curves.append(curve)
        res_A.append(resolution_angstrom(curve, box, px))
        shells.append(resolution_shell(curve))

    got = _gather(assign, order)
    post, index = got["posterior"], got["index"]
    changed = None
    if prev_assign:
        before = _gather(prev_assign, half_b_order(mdl))
        changed = changed_fraction(index, post, before["index"], before["posterior"])
    self_ev = _self_evidence(got.get("self_evidence_stats"), order, changed)
    sigma2 = updated_spectrum(got["noise_power"], got["noise_count"], mdl["sigma2"])
    if "sigma2_groups" in mdl:  # one spectrum per optics group
        sigma2_groups = updated_group_spectra(
            got["noise_power_groups"], got["noise_count_groups"], mdl["sigma2_groups"]
        )
    res_px = next_resolution_limit(
        float(mdl["res_limit_px"]),
        max(shells) if shells else 0.0,
        box,
        px,
        settings["max_resolution_A"],
    )
    extra = {}
    if decay > 0 and iteration < int(settings["online_em_iterations"]):
        extra = {"num": num.astype(np.complex64), "wgt": wgt.astype(np.float32)}
    run_files.write_references(out_refs, maps, **extra)
    stats = {
        "iteration": iteration,
        "n_particles": int(mdl["n_particles"]),
        "n_particles_used": int(len(post)),
        "box": box,
        "pixel_size": px,
        "n_classes": k_classes,
        "class_fractions": class_fractions(post),
        "class_sizes_hard": np.bincount(post.argmax(1), minlength=k_classes).tolist(),
        "half_b_order": order.tolist(),
        **({"self_evidence": self_ev} if self_ev is not None else {}),
        "changed_fraction": changed,
        "same_map_groups": mdl.get("same_map_groups", []),  # the start, for the schedule
        "posterior_entropy": posterior_entropy(post),
        # each class's median fit score: the junk flag's zero (hetrefine.junk)
        **(
            {"fit_score_centre": class_centres(got["fit_score"], hard_classes(post), k_classes)}
            if "fit_score" in got
            else {}
        ),
        "fsc": [c.tolist() for c in curves],
        "resolution_A": res_A,
        "sigma2": sigma2.tolist(),
        **({"sigma2_groups": sigma2_groups.tolist()} if "sigma2_groups" in mdl else {}),
        "res_limit_px": res_px,
        "res_limit_A": box * px / res_px,
        "res_used_A": box * px / float(mdl["res_limit_px"]),
        "hetrefine": __version__,
    }
    # separated, converged, stopped_at, stop_reason: the rule of hetrefine.convergence
    prev_px = float(mdl["res_limit_px"])
    stats.update(
        convergence.verdict(post, changed, res_px, prev_px, iteration, settings, maps, mask_vol)
    )
    run_files.write_model(out_model, stats)
    log.info(
        "iteration %d: %d particles, class sizes %s, resolution %s A, changed %s, "
        "next limit %.1f A, entropy %.3f%s, %.1f s",
        iteration,
        len(post),
        stats["class_sizes_hard"],
        [f"{r:.1f}" if r else "-" for r in res_A],
        f"{changed:.3f}" if changed is not None else "-",
        stats["res_limit_A"],
        stats["posterior_entropy"],
        ", converged" if stats["converged"] else "",
        time.time() - t0,
    )
