"""Class posteriors from per-class evidence, class similarity, online-EM batches,
and the class statistics of an iteration. Functions take numbers, not the config."""

from __future__ import annotations

import numpy as np


def anneal_similarity(iteration: int, similarity: float, anneal_iterations: int) -> float:
    """Class similarity at ``iteration`` (1-based): linear from ``similarity`` at
    iteration 1 to 0 after ``anneal_iterations``."""
    if anneal_iterations <= 0 or similarity <= 0:
        return 0.0
    return float(similarity * max(0.0, 1.0 - (iteration - 1) / anneal_iterations))


def random_assignment(index: np.ndarray, n_classes: int, iteration: int, seed: int) -> np.ndarray:
    """One-hot posteriors (n, K) float32 of a random class per particle, seeded by the
    particle's index (so independent of the sharding)."""
    n = len(index)
    u = np.random.default_rng([int(seed), 13, iteration]).integers(
        0, n_classes, int(index.max()) + 1 if n else 0
    )
    out = np.zeros((n, n_classes), np.float32)
    out[np.arange(n), u[index]] = 1.0
    return out


def class_posteriors(
    evidence: np.ndarray, prior: np.ndarray, beta: float, hard: bool = False
) -> np.ndarray:
    """Posterior (n, K) float32 over classes.

    evidence: (n, K) log-likelihood of each particle under each class with the pose
    marginalised; prior: (K,) class fractions; beta = 1 - similarity scales the
    log-likelihoods (beta < 1 makes early posteriors softer); ``hard`` gives one-hot rows.
    """
    n = evidence.shape[0]
    logits = beta * np.asarray(evidence, np.float64) + np.log(np.maximum(prior, 1e-12))[None, :]
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    if hard:
        one_hot = np.zeros_like(p)
        one_hot[np.arange(n), p.argmax(axis=1)] = 1.0
        p = one_hot
    return p.astype(np.float32)


def online_em_selection(
    index: np.ndarray,
    n_total: int,
    n_classes: int,
    iteration: int,
    online_iterations: int,
    batch_size_per_class: int,
    seed: int,
) -> np.ndarray:
    """Boolean mask of the shard's particles in this iteration's batch.

    During the first ``online_iterations`` iterations each particle is in the
    batch with probability min(1, K * batch_size_per_class / N), decided by a
    seeded draw per particle index, so the batch does not depend on the sharding.
    Later iterations use every particle.
    """
    if iteration > online_iterations:
        return np.ones(len(index), bool)
    q = min(1.0, n_classes * batch_size_per_class / max(n_total, 1))
    if q >= 1.0:
        return np.ones(len(index), bool)
    u = np.random.default_rng([int(seed), 101, iteration]).random(n_total)
    return u[index] < q


def posterior_entropy(post: np.ndarray) -> float:
    """Mean Shannon entropy (nats) of the class posterior rows."""
    if len(post) == 0:
        return 0.0
    p = np.clip(np.asarray(post, np.float64), 1e-12, 1.0)
    return float(-(p * np.log(p)).sum(axis=1).mean())


def hard_classes(posterior: np.ndarray) -> np.ndarray:
    """0-based class of each particle (N,) int64: argmax of the posterior (ties: lowest class)."""
    return np.argmax(np.asarray(posterior), axis=1).astype(np.int64)


POSTERIOR_TEMPERATURE = 1.5
"""The temperature of the class posteriors the outputs report (``rlnMaxValueProbDistribution``,
``hrClassPosterior_*``, the .cs ``class_posterior``, the posterior histogram): the
engine's posteriors are over-confident because each particle's own image is in its own
half-set's class map (the self-evidence, :func:`self_evidence`), and the per-class
estimate of that gain is too noisy to take out particle by particle (it lost 1.4 points
of accuracy on adk3_snr005). Measured on the issue 18 sets (bench/RESULTS.md section 9,
"Calibration by a posterior temperature"): observed / expected errors 1.14-3.36 at
temperature 1, 0.70-1.14 at 1.5 on 8 of 9 runs (two and three states, SNR 0.02 and
0.05, distinct, one-map and random-subset starts; the junk set 1.80 on one seed, 1.48
on another). It over-softens at low SNR (adk2_snr002: 0.70), where a particle weighs
less in its map."""


def calibrated_posteriors(posterior: np.ndarray, temperature: float = POSTERIOR_TEMPERATURE):
    """Posteriors (n, K) float64 tempered for reporting: p^(1/T), renormalised per row.
    The order of each row's classes, so the class (argmax), is unchanged (in float64:
    two float32 posteriors a rounding apart stay apart, as the hard-assignment maps'
    argmax of the untempered ones has them); the engine's own weights (backprojection,
    class fractions) are not tempered."""
    with np.errstate(divide="ignore"):  # a zero posterior stays zero
        logp = np.log(np.asarray(posterior, np.float64)) / float(temperature)
    logp -= logp.max(axis=1, keepdims=True)
    q = np.exp(logp)
    return q / q.sum(axis=1, keepdims=True)


def class_fractions(posterior: np.ndarray) -> list[float]:
    """Soft class fractions (the next iteration's prior), each at least 1e-3, summing to 1."""
    k = posterior.shape[1]
    f = posterior.sum(axis=0) / max(len(posterior), 1) if len(posterior) else np.zeros(k)
    f = np.maximum(f, 1e-3)
    return (f / f.sum()).tolist()


def changed_fraction(index, posterior, prev_index, prev_posterior) -> float | None:
    """Fraction of the particles in both iterations whose hard class changed; None
    when no particle is in both."""
    prev = dict(zip(np.asarray(prev_index).tolist(), hard_classes(prev_posterior).tolist()))
    both = [
        (c, prev[i])
        for i, c in zip(np.asarray(index).tolist(), hard_classes(posterior).tolist())
        if i in prev
    ]
    if not both:
        return None
    return float(np.mean([a != b for a, b in both]))


#: Arrays of an assignment file with a class axis (axis 1): relabelled with half B's classes.
CLASS_AXIS_KEYS = ("posterior", "euler", "shift", "loglik", "pose_peak", "scale")


def half_b_order(model: dict) -> np.ndarray | None:
    """The permutation ``order`` (K,) int that ``steps.reconstruct`` applied to half B's
    classes of the iteration whose ``model.json`` this is (half B's class k is the class
    ``order[k]`` its align step wrote); None when it kept them as they were."""
    order = model.get("half_b_order")
    if order is None or list(order) == list(range(len(order))):
        return None
    return np.asarray(order, np.int64)


def relabel_half_b(assign: dict, order: np.ndarray | None) -> dict:
    """Assignment arrays (``index``, ``half`` and the per-class arrays
    :data:`CLASS_AXIS_KEYS`, (n, K, ...)) with half B's particles in the classes that
    reconstruct matched to half A's: column k of a half B row becomes its column
    ``order[k]``. A new dict; the input is unchanged (and returned as is when ``order``
    is None)."""
    if order is None:
        return assign
    out = dict(assign)
    rows = np.flatnonzero(np.asarray(assign["half"]) == 1)
    for key in CLASS_AXIS_KEYS:
        if key in assign:
            a = np.array(assign[key], copy=True)
            a[rows] = a[rows][:, order]
            out[key] = a
    return out


#: A class holding more than this share of the particles, or posteriors whose mean
#: entropy is above this share of ln K, means the classes did not separate.
UNSEPARATED_SHARE = 0.98
UNSEPARATED_ENTROPY = 0.9


def separation_problem(posterior: np.ndarray) -> str | None:
    """Why the classes did not separate (one class holds nearly every particle, or the
    posteriors stay near uniform), or None when they did. posterior (n, K)."""
    n, k = posterior.shape
    if n == 0 or k < 2:
        return None
    sizes = np.bincount(hard_classes(posterior), minlength=k)
    top = int(sizes.argmax())
    if sizes[top] > UNSEPARATED_SHARE * n:
        return f"class {top + 1} holds {sizes[top]} of {n} particles"
    h = posterior_entropy(posterior)
    if h > UNSEPARATED_ENTROPY * np.log(k):
        return f"the class posteriors stay near uniform (mean entropy {h:.2f} of at most {np.log(k):.2f} nats)"
    return None


def fit_score(cross: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """Per-particle goodness of fit (n,) float32: how well the particle's class explains
    it at its best pose, relative to what the noise model expects of a true particle of
    that CTF and noise.

    cross, norm (n, S) per Fourier shell (``likelihood.fit_terms_at_poses``). In shell s
    the log-likelihood gain over the no-signal model is 2 cross_s - norm_s; for an image
    Y = C A + noise (noise power sigma2) it has mean norm_s = sum C^2 |A|^2 / sigma2 and
    variance 2 norm_s, so z_s = (cross_s - norm_s) sqrt(2 / norm_s) is ~N(0, 1) and the
    shells are independent. The score combines them with weights
    w_s = sqrt(norm_s / (1 + norm_s)) (about 1 where the shell holds at least one nat of
    the particle's signal, fading where it holds none) as
    sum w_s z_s / sqrt(sum w_s^2): ~N(0, 1) for a particle the class explains, whatever
    its defocus. An image the class cannot explain falls short in every shell by
    (1 - its correlation with the slice) sqrt(2 norm_s): weighing shells alike, not by
    their signal energy (which the lowest shells dominate, where any particle of the
    same size and mass looks alike), lets the shells where shapes differ decide.
    Intensity is taken at the map's grey scale (scale 1). The zero-frequency shell is
    left out; NaN where no shell holds signal.
    """
    cross = np.asarray(cross, np.float64)[:, 1:]
    norm = np.maximum(np.asarray(norm, np.float64)[:, 1:], 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(norm > 0, (cross - norm) * np.sqrt(2.0 / np.maximum(norm, 1e-30)), 0.0)
        w = np.sqrt(norm / (1.0 + norm))
        den = np.sqrt((w * w).sum(axis=1))
        score = np.where(den > 0, (w * z).sum(axis=1) / np.maximum(den, 1e-30), np.nan)
    return score.astype(np.float32)


def fit_score_flags(score: np.ndarray, threshold: float | None) -> np.ndarray:
    """Boolean (n,): particles whose fit score is below ``threshold`` (None: none flagged;
    a NaN score is not flagged)."""
    score = np.asarray(score, np.float64)
    if threshold is None:
        return np.zeros(score.shape, bool)
    with np.errstate(invalid="ignore"):
        return score < float(threshold)


def self_evidence(evidence, sample, evidence_other, prior, beta: float) -> np.ndarray:
    """Per-class evidence (K,) a particle gains from its own image in its class's
    reference, measured between the half-sets: ``sample`` (s,) rows of ``evidence`` (n, K)
    (own half-set's maps) also scored against the other half-set's maps
    (``evidence_other`` (s, K)), which do not hold them. A particle is in class k's
    reference with its posterior weight p_k, so own - other = self_k p_k + the half-maps'
    own difference (common to every particle) + noise: self_k is the least-squares
    slope of own - other on p_k over the sample (at least 0; 0 when p_k does not vary).
    The same as :func:`self_evidence_from_stats` of :func:`self_evidence_stats`."""
    d = np.asarray(evidence, np.float64)[sample] - np.asarray(evidence_other, np.float64)
    p = class_posteriors(evidence, prior, beta)[sample]
    return self_evidence_from_stats(self_evidence_stats(d, p))


#: Columns of :func:`self_evidence_stats`: count, sum p, sum p^2, sum d, sum p d.
SELF_EVIDENCE_STATS = 5


def self_evidence_stats(d, p) -> np.ndarray:
    """The sufficient statistics (K, 5) float64 of the self-evidence slope
    (:func:`self_evidence`) over some sample particles: per class, the count, sum p,
    sum p^2, sum d and sum p d, from ``d`` (s, K) = own minus other half-set's evidence
    and ``p`` (s, K) the class posteriors. Sums over chunks and shards add up exactly
    to the whole data set's, so the slope does not depend on how the data were split."""
    d = np.asarray(d, np.float64)
    p = np.asarray(p, np.float64)
    n = np.full(d.shape[1], float(len(d)))
    return np.stack([n, p.sum(0), (p * p).sum(0), d.sum(0), (p * d).sum(0)], axis=1)


def self_evidence_from_stats(stats) -> np.ndarray:
    """Per-class self-evidence (K,) (nats, at least 0) from :func:`self_evidence_stats`
    (..., K, 5): the leading axes are groups with their own intercept (the half-sets,
    whose maps differ from the other half's in their own way), pooled into one slope per
    class (the within-group least-squares slope); 0 where p does not vary."""
    st = np.asarray(stats, np.float64).reshape(-1, *np.shape(stats)[-2:])
    n, sp, spp, sd, spd = (st[..., c] for c in range(SELF_EVIDENCE_STATS))
    safe = np.maximum(n, 1.0)
    var = np.where(n > 0, spp - sp * sp / safe, 0.0).sum(0)
    cov = np.where(n > 0, spd - sp * sd / safe, 0.0).sum(0)
    ok = var > 1e-6 * n.sum(0)
    return np.where(ok, np.maximum(0.0, cov / np.where(ok, var, 1.0)), 0.0)


def without_self_evidence(evidence, self_ev, prior, beta: float, n_iter: int = 60) -> np.ndarray:
    """Evidence (n, K) with each particle's self-evidence taken out: a particle is in class
    k's reference with its (corrected) posterior weight p_k, so its evidence is
    ev + ``self_ev`` p(ev); ev is solved for by a damped fixed-point iteration (for two
    classes the solution is unique: the gap ev_1 - ev_2 + self tanh(gap / 2) grows
    monotonically)."""
    own = np.asarray(evidence, np.float64)
    s = np.asarray(self_ev, np.float64)[None, :]
    p = class_posteriors(own, prior, beta).astype(np.float64)
    for _ in range(n_iter):
        p = 0.5 * p + 0.5 * class_posteriors(own - s * p, prior, beta)
    return own - s * p


CLASS_EVIDENCE_MODES = ("coarse", "fine", "gated")
"""Where a particle's class evidence comes from (config ``class_evidence``)."""


def gated_class_evidence(
    coarse: np.ndarray,
    fine: np.ndarray,
    coarse_peak: np.ndarray,
    considered: np.ndarray,
    full_share: float,
    resolved: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Class evidence (n, K) between the coarse grid's and the final local level's, and
    the weight (n,) given to the latter: ev = coarse + w (fine - coarse).

    coarse (n, K): the log mean likelihood over the whole coarse grid (it integrates
    every pose, but at its 15-degree step it samples a sharp pose posterior only near
    its nearest grid point, by a class-dependent amount); fine (n, K): the same from
    the final local window (exact where the posterior lies inside the window, too low
    where it does not; ``alignment.PoseResult.fine_evidence``); coarse_peak (n, K): the
    share of the coarse posterior held by the best coarse pose, which the window is
    centred on; considered (n, K): the pairs that were refined locally (the classes the
    particle could be in). The weight of one class is its share over ``full_share``
    (at most 1); the particle's weight is the least over its considered classes (one
    weight per particle, so the two evidences' per-particle offset cancels between its
    classes; fine for one class only where every competing class is peaked too).
    Pairs not considered have the fine evidence of their best considered class's
    offset (``alignment``), so any weight keeps their coarse weight relative to it.

    resolved (K,) bool, optional: the classes whose references resolve the shells the
    final level adds to the coarse one (their half-set resolution finer than the coarse
    search's radius); an unresolved class has weight 0. A peaked coarse posterior does
    not say the peak is the right pose: where a class's map is poor (the compact state
    at SNR 0.02) its poses are wrong but peaked, and the fine evidence, which adds
    shells that only the better classes resolve, moves its particles to them."""
    coarse = np.asarray(coarse, np.float64)
    fine = np.asarray(fine, np.float64)
    w_k = np.clip(np.asarray(coarse_peak, np.float64) / float(full_share), 0.0, 1.0)
    if resolved is not None:
        w_k = np.where(np.asarray(resolved, bool)[None, :], w_k, 0.0)
    w_k = np.where(np.asarray(considered, bool), w_k, 1.0)
    w = w_k.min(axis=1) if w_k.shape[1] else np.zeros(len(w_k))
    return coarse + w[:, None] * (fine - coarse), w
