"""When the refinement stops: the convergence rule and the pass-through iterations.

The rule (``verdict``), taken by ``steps.reconstruct`` at every iteration i: the run has
converged at i when

- the classes separated (``classification.separation_problem``: no class holds nearly
  every particle, the posteriors are not near uniform);
- fewer than ``convergence_changed_fraction`` of the particles changed class since
  iteration i - 1 (CryoSPARC's convergence criterion for classification);
- the resolution limit of the next iteration moved by less than one Fourier shell: no
  resolution gain, so the next iteration would search as this one did (RELION's
  auto-refine stops likewise when the resolution stops improving and the hidden
  variables stop changing; the local search levels follow the resolution limit, so a
  steady limit is also a steady angular sampling);
- i is past every early regime and the iteration before was in the final regime too:
  online EM (``online_em_iterations``: the stopping iteration is a full-data pass),
  random assignment and the annealing of the class similarity (:func:`earliest_stop`).

``iterations`` is the cap. With ``stop_when_converged`` the converged iteration writes
``stopped_at`` into its ``model.json``; every later iteration up to the cap is a
pass-through (the DAG stays static, so every parse plans the same jobs, on a cluster
too, and a resumed run does the same): ``align`` copies the shard's previous
assignments and writes empty sums (:func:`pass_through_align`), ``reduce_sums`` adds
empty sums, ``reconstruct`` copies the references and the statistics, marked
``passed_through`` (:func:`pass_through_reconstruct`). The final outputs, taken from
the last iteration, are the stopping iteration's. A run that reaches the cap says so,
and why it did not converge (:func:`stop_summary`).

``converged`` is only true when all of the above hold; a run whose classes never
separated says so in every iteration's ``separated`` and ``stop_reason``.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping

import numpy as np

from hetrefine.classification import separation_problem
from hetrefine.fsc import fsc
from hetrefine.io import run_files
from hetrefine.io.atomic import atomic_path

log = logging.getLogger("hetrefine")

RESOLUTION_SHELLS = 1.0
"""A resolution limit that moves by less than this many shells is no resolution gain."""

SAME_STRUCTURE_CORRELATION = 0.97
"""Two classes whose signals correlate at least this much (:func:`signal_correlation`)
are one structure split by noise, not separated classes. Measured on the maps of
finished runs: a one-state set split into two classes 1.00; two AdK states 0.58
(SNR 0.05) and 0.65 (SNR 0.02); three states with an intermediate 0.52 to 0.74; two
well separated phantom states 0.81."""

MIN_MEASURED_SHELLS = 3
"""Fewer shells than this with both half-set FSCs above 0.5: no verdict on sameness."""


def signal_correlation(maps: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Correlation of the classes' signals (K, K), noise taken out (NaN where not measured).

    maps (K, 2, D, D, D) half-maps; in each shell the cross-class FSC between half-maps of
    independent particle sets (class k half h against class l half 1 - h) estimates the
    signal covariance, the half-set FSCs the signal variances, so
    rho_s = FSC(k_h, l_1-h) / sqrt(FSC(k_A, k_B) FSC(l_A, l_B)) is 1 for two classes of
    one structure at any noise level. The mean over the shells (beyond the zeroth) where
    both half-set FSCs exceed 0.5 (at least :data:`MIN_MEASURED_SHELLS`)."""
    k_classes = maps.shape[0]
    within = [fsc(maps[k, 0], maps[k, 1], mask) for k in range(k_classes)]
    out = np.full((k_classes, k_classes), np.nan)
    for k in range(k_classes):
        out[k, k] = 1.0
        for j in range(k + 1, k_classes):
            cross = 0.5 * (fsc(maps[k, 0], maps[j, 1], mask) + fsc(maps[k, 1], maps[j, 0], mask))
            good = (within[k] > 0.5) & (within[j] > 0.5)
            good[0] = False
            if good.sum() >= MIN_MEASURED_SHELLS:
                rho = cross[good] / np.sqrt(within[k][good] * within[j][good])
                out[k, j] = out[j, k] = float(rho.mean())
    return out


def same_structure(maps: np.ndarray, mask: np.ndarray) -> str | None:
    """Which classes are one structure within the noise (:data:`SAME_STRUCTURE_CORRELATION`),
    as a phrase, or None when every pair measured differs."""
    rho = signal_correlation(maps, mask)
    pairs = [
        f"classes {k + 1} and {j + 1} are one structure within the noise (signal correlation {rho[k, j]:.2f})"
        for k in range(len(rho))
        for j in range(k + 1, len(rho))
        if rho[k, j] >= SAME_STRUCTURE_CORRELATION
    ]
    return "; ".join(pairs) if pairs else None


def earliest_stop(settings: Mapping) -> int:
    """The first iteration at which the run may stop: the second iteration of the final
    regime (every particle, no random assignment, class similarity annealed to 0), so
    that the changed fraction compares two iterations run alike."""
    last_early = max(
        int(settings["online_em_iterations"]),
        int(settings["random_assignment_iterations"]),
        int(settings["class_similarity_anneal_iterations"]),
    )
    return last_early + 2


def settled(
    changed: float | None, res_limit_px: float, previous_res_limit_px: float, max_changed: float
) -> bool:
    """Fewer than ``max_changed`` of the particles changed class (None: not measured, not
    settled) and the resolution limit moved by less than :data:`RESOLUTION_SHELLS`."""
    return bool(
        changed is not None
        and changed < max_changed
        and abs(res_limit_px - previous_res_limit_px) < RESOLUTION_SHELLS
    )


def verdict(
    posterior: np.ndarray,
    changed: float | None,
    res_limit_px: float,
    previous_res_limit_px: float,
    iteration: int,
    settings: Mapping,
    maps: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    cap: int | None = None,
) -> dict:
    """The convergence fields of iteration ``iteration``'s ``model.json``.

    ``separated`` (bool: the posteriors split the particles, and, given the half-maps
    ``maps`` (K, 2, D, D, D) and their ``mask``, no two classes are one structure:
    :func:`same_structure`), ``converged`` (bool: every condition of the module's rule),
    ``stopped_at`` (this iteration when it converged and ``stop_when_converged``, else
    None) and ``stop_reason`` (one line: why it stopped, or why not yet). posterior (n, K)
    of this iteration; ``cap``: the ``iterations`` cap, when known (for the reason)."""
    problem = separation_problem(posterior)
    if problem is None and maps is not None and len(maps) > 1:
        problem = same_structure(maps, mask)
    max_changed = float(settings["convergence_changed_fraction"])
    first = earliest_stop(settings)
    steady = settled(changed, res_limit_px, previous_res_limit_px, max_changed)
    ok = problem is None and steady and iteration >= first
    stop = ok and bool(settings["stop_when_converged"])
    if problem is not None:
        reason = f"the classes have not separated: {problem}"
    elif ok:
        reason = (
            f"converged at iteration {iteration}: {100 * changed:.2f}% of the particles changed "
            f"class (< {100 * max_changed:g}%) and the resolution limit moved "
            f"{abs(res_limit_px - previous_res_limit_px):.2f} shells (< {RESOLUTION_SHELLS:g})"
        )
    elif iteration < first:
        reason = f"not converged: no stop before iteration {first} (the early iterations' regime)"
    elif changed is None or changed >= max_changed:
        got = "not measured" if changed is None else f"{100 * changed:.2f}%"
        reason = f"not converged: {got} of the particles changed class (>= {100 * max_changed:g}%)"
    else:
        reason = (
            f"not converged: the resolution limit moved "
            f"{abs(res_limit_px - previous_res_limit_px):.2f} shells"
        )
    if problem is not None and iteration > int(settings["online_em_iterations"]):
        log.warning("iteration %d: the classes have not separated: %s", iteration, problem)
    if stop:
        more = (
            f"; iterations {iteration + 1}..{cap} pass through" if cap and cap > iteration else ""
        )
        log.info("%s: the run stops here%s", reason, more)
    return {
        "separated": problem is None,
        "converged": ok,
        "stopped_at": iteration if stop else None,
        "stop_reason": reason,
    }


def stopped(model: Mapping) -> int | None:
    """The iteration at which the run stopped, from an iteration's statistics (None: it
    has not stopped)."""
    at = model.get("stopped_at")
    return None if at is None else int(at)


def pass_through_align(
    model: str, prev_assign: list[str], out_assign: str, out_sums: str, iteration: int
) -> bool:
    """When the run stopped before ``iteration`` (``model``: iteration - 1's statistics),
    write the shard's previous assignments again and empty sums (no particle read, no
    backprojection) and return True; else return False and write nothing."""
    mdl = run_files.read_model(model)
    at = stopped(mdl)
    if at is None:
        return False
    if len(prev_assign) != 1:
        raise ValueError(
            f"a pass-through needs the shard's one previous assignment file, got {prev_assign}"
        )
    _copy(prev_assign[0], out_assign, ".npz")
    k = int(mdl["n_classes"])
    run_files.write_sums(
        out_sums, np.zeros((k, 2, 0), np.complex64), np.zeros((k, 2, 0), np.float32), 0
    )
    log.info("align iteration %d: passed through (the run stopped at iteration %d)", iteration, at)
    return True


def pass_through_reconstruct(
    prev_model: str, prev_refs: str, out_refs: str, out_model: str, iteration: int
) -> bool:
    """When the run stopped before ``iteration``, copy iteration - 1's references and
    statistics (marked ``passed_through``, ``iteration`` set, no class changed) and return
    True; else return False and write nothing."""
    mdl = run_files.read_model(prev_model)
    at = stopped(mdl)
    if at is None:
        return False
    _copy(prev_refs, out_refs, ".npz")
    run_files.write_model(
        out_model, {**mdl, "iteration": iteration, "passed_through": True, "changed_fraction": 0.0}
    )
    log.info("iteration %d: passed through (the run stopped at iteration %d)", iteration, at)
    return True


def _copy(src: str, dst: str, suffix: str) -> None:
    with atomic_path(dst, suffix=suffix) as tmp:
        shutil.copyfile(src, tmp)


def stop_summary(model: Mapping, cap: int | None = None) -> str:
    """One line for the log and the report: at which iteration the run stopped and why,
    or that it reached the cap (``cap``, default the model's iteration) without
    converging, and why (e.g. the classes never separated). ``model``: the last
    iteration's statistics."""
    last = int(model.get("iteration", 0))
    cap = last if cap is None else cap
    at = stopped(model)
    reason = str(model.get("stop_reason") or "")
    if at is not None:
        return f"stopped at iteration {at} of at most {cap}: {reason}"
    if model.get("converged"):
        return f"ran all {cap} iterations (stop_when_converged: false); {reason}"
    if model.get("separated") is False:
        return f"reached the iteration cap ({cap}) and never separated: {reason.removeprefix('the classes have not separated: ')}"
    if reason:
        return f"reached the iteration cap ({cap}) without converging ({reason.removeprefix('not converged: ')})"
    return f"ran {cap} iterations (no convergence statistics)"
