"""Step of rule `reconstruct`: sum every shard's backprojections, make the half-maps per
class, their FSC and resolution, the noise spectrum and the class statistics."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import numpy as np

from hetrefine import __version__
from hetrefine.classification import (
    changed_fraction,
    class_fractions,
    converged,
    posterior_entropy,
    separation_problem,
)
from hetrefine.fsc import resolution_angstrom, resolution_shell
from hetrefine.io import run_files
from hetrefine.io.mrc import read_volume
from hetrefine.noise import updated_group_spectra, updated_spectrum
from hetrefine.reconstruction import add_centered, half_maps, unpack_sums
from hetrefine.schedule import held_at_start, next_resolution_limit
from hetrefine.symmetry import symmetry_matrices

log = logging.getLogger("hetrefine")


def _gather(assign: list[str]):
    """Posteriors, indices and summed residual noise power of the shards' assignments."""
    posts, idx, noise_p, noise_c = [], [], 0.0, 0.0
    for p in sorted(assign):
        d = run_files.read_assignments(p)
        posts.append(d["posterior"])
        idx.append(d["index"])
        noise_p = noise_p + d["noise_power"]
        noise_c = noise_c + d["noise_count"]
    return np.concatenate(posts), np.concatenate(idx), noise_p, noise_c


def _gather_groups(assign: list[str]):
    """Summed residual noise power and count per optics group, (G, shells) each."""
    noise_p, noise_c = 0.0, 0.0
    for p in sorted(assign):
        d = run_files.read_assignments(p)
        noise_p = noise_p + d["noise_power_groups"]
        noise_c = noise_c + d["noise_count_groups"]
    return noise_p, noise_c


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

    post, index, noise_p, noise_c = _gather(assign)
    changed = None
    if prev_assign:
        prev_post, prev_index, _, _ = _gather(prev_assign)
        changed = changed_fraction(index, post, prev_index, prev_post)
    sigma2 = updated_spectrum(noise_p, noise_c, mdl["sigma2"])
    if "sigma2_groups" in mdl:  # one spectrum per optics group
        sigma2_groups = updated_group_spectra(*_gather_groups(assign), mdl["sigma2_groups"])
    res_px = next_resolution_limit(
        float(mdl["res_limit_px"]),
        max(shells) if shells else 0.0,
        box,
        px,
        settings["max_resolution_A"],
    )
    if held_at_start(iteration, mdl):  # from one map: at the start resolution a while
        res_px = float(mdl["res_limit_px"])
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
        "changed_fraction": changed,
        "same_map_groups": mdl.get("same_map_groups", []),  # the start, for the schedule
        "posterior_entropy": posterior_entropy(post),
        "fsc": [c.tolist() for c in curves],
        "resolution_A": res_A,
        "sigma2": sigma2.tolist(),
        **({"sigma2_groups": sigma2_groups.tolist()} if "sigma2_groups" in mdl else {}),
        "res_limit_px": res_px,
        "res_limit_A": box * px / res_px,
        "res_used_A": box * px / float(mdl["res_limit_px"]),
        "hetrefine": __version__,
    }
    # `converged` only when the classes separated: a run in which one class took every
    # particle is stable, not converged, and says so
    problem = separation_problem(post)
    stats["separated"] = problem is None
    stats["converged"] = problem is None and converged(changed, res_px, float(mdl["res_limit_px"]))
    if problem and iteration > int(settings["online_em_iterations"]):
        log.warning("iteration %d: the classes have not separated: %s", iteration, problem)
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
