"""Class posteriors from per-class evidence, class similarity, online-EM batches."""

from __future__ import annotations

import numpy as np


def anneal_similarity(iteration: int, config: dict) -> float:
    """Class similarity at ``iteration`` (1-based): linear from ``class_similarity`` at
    iteration 1 to 0 after ``class_similarity_anneal_iterations``."""
    s0 = float(config.get("class_similarity", 0.0))
    n = int(config.get("class_similarity_anneal_iterations", 0))
    if n <= 0 or s0 <= 0:
        return 0.0
    return float(s0 * max(0.0, 1.0 - (iteration - 1) / n))


def class_posteriors(
    evidence: np.ndarray,
    prior: np.ndarray,
    beta: float,
    iteration: int,
    index: np.ndarray,
    config: dict,
) -> np.ndarray:
    """Posterior (n, K) float32 over classes.

    evidence: (n, K) log-likelihood of each particle under each class with the pose
    marginalised; prior: (K,) class fractions; beta = 1 - similarity scales the
    log-likelihoods (beta < 1 makes early posteriors softer). The first
    ``random_assignment_iterations`` iterations assign each particle to a random
    class (seeded by particle index); ``classification: hard`` gives one-hot rows.
    """
    n, k = evidence.shape
    if iteration <= int(config.get("random_assignment_iterations", 0)):
        u = np.random.default_rng([int(config.get("seed", 0)), 13, iteration]).integers(
            0, k, int(index.max()) + 1 if len(index) else 0
        )
        out = np.zeros((n, k), np.float32)
        out[np.arange(n), u[index]] = 1.0
        return out
    logits = beta * np.asarray(evidence, np.float64) + np.log(np.maximum(prior, 1e-12))[None, :]
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    if str(config.get("classification", "soft")) == "hard":
        hard = np.zeros_like(p)
        hard[np.arange(n), p.argmax(axis=1)] = 1.0
        p = hard
    return p.astype(np.float32)


def online_em_selection(
    index: np.ndarray, n_total: int, n_classes: int, iteration: int, config: dict
) -> np.ndarray:
    """Boolean mask of the shard's particles in this iteration's batch.

    During the first ``online_em_iterations`` iterations each particle is in the
    batch with probability min(1, K * batch_size_per_class / N), decided by a
    seeded draw per particle index, so the batch does not depend on the sharding.
    Later iterations use every particle.
    """
    if iteration > int(config.get("online_em_iterations", 0)):
        return np.ones(len(index), bool)
    q = min(1.0, n_classes * int(config.get("batch_size_per_class", 1000)) / max(n_total, 1))
    if q >= 1.0:
        return np.ones(len(index), bool)
    u = np.random.default_rng([int(config.get("seed", 0)), 101, iteration]).random(n_total)
    return u[index] < q


def posterior_entropy(post: np.ndarray) -> float:
    """Mean Shannon entropy (nats) of the class posterior rows."""
    if len(post) == 0:
        return 0.0
    p = np.clip(np.asarray(post, np.float64), 1e-12, 1.0)
    return float(-(p * np.log(p)).sum(axis=1).mean())
