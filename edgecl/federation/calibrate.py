"""Calibrating the global head on every site's classes (numpy only, no Flower, no torch).

Averaging students whose sites saw different classes gives a backbone that no head was
trained on: each head row was trained only against its own site's classes, on its own
site's backbone. So after the backbone is aggregated, every site reports, for each class in
its replay buffer, how many samples it holds and the mean and variance of their embeddings
under that aggregated backbone, and its leading principal directions (`model.stats`; the
samples never leave the site). The server draws the same number of virtual embeddings for
every class from a Gaussian with those moments (the principal directions plus a diagonal
rest) and fits the head rows of those classes to them with softmax regression, starting
from the aggregated rows (CCVR, Luo et al., "No Fear of
Heterogeneity: Classifier Calibration for Federated Learning with Non-IID Data", NeurIPS
2021). A label no site reported keeps its aggregated row.
"""
from __future__ import annotations

import numpy as np

from edgecl.client.federation import ClassStats

VIRTUAL_PER_CLASS = 256   # virtual embeddings drawn per class
FIT_STEPS = 300           # steps of the short fit, whose row norm the head keeps
CONVERGED_STEPS = 3000    # steps of the fit whose direction the head takes
FIT_LR = 0.05
FIT_MOMENTUM = 0.9
FITS = ("scaled", "short")  # calibrate_head(fit=...): see fit_head


def pool(reports: list[ClassStats]) -> dict:
    """label -> (count, mean, variance, directions) over every site that reported it: the
    moments of the union of their samples. The directions (rows) are every site's principal
    directions and the sites' offsets from the pooled mean, each weighted by the site's
    share of the samples, so that their outer products add up to the union's covariance
    within the span they cover."""
    parts: dict = {}
    for report in reports:
        comps = report.components if report.components is not None else \
            np.zeros((len(report.labels), 0, report.mean.shape[1]), np.float32)
        for label, n, m, v, c in zip(report.labels, report.counts, report.mean, report.var,
                                     comps):
            if n > 0:
                parts.setdefault(label, []).append(
                    (n, m.astype(np.float64), v.astype(np.float64), c.astype(np.float64)))
    out = {}
    for label, sites in parts.items():
        total = sum(n for n, *_ in sites)
        mean = sum(n * m for n, m, *_ in sites) / total
        var = sum(n * (v + (m - mean) ** 2) for n, m, v, _ in sites) / total
        rows = [np.sqrt(n / total) * c for n, _, _, c in sites]
        if len(sites) > 1:
            rows += [np.sqrt(n / total) * (m - mean)[None] for n, m, *_ in sites]
        out[label] = (total, mean, var, np.concatenate(rows))
    return out


def virtual_features(pooled: dict, labels: list, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """VIRTUAL_PER_CLASS draws per reported label (equal priors: the head should not favour
    the classes most samples came from), their rows in `labels`, and which rows those are.
    A draw is the mean, plus a Gaussian along the principal directions, plus independent
    Gaussian noise for the variance those directions leave over in each dimension."""
    rows = [i for i, label in enumerate(labels) if label in pooled]
    xs = []
    for i in rows:
        _, mean, var, comps = pooled[labels[i]]
        rest = np.sqrt(np.maximum(var - (comps ** 2).sum(axis=0), 0.0))
        xs.append(mean + rng.standard_normal((VIRTUAL_PER_CLASS, len(comps))) @ comps
                  + rng.standard_normal((VIRTUAL_PER_CLASS, len(mean))) * rest)
    ys = np.repeat(np.arange(len(rows)), VIRTUAL_PER_CLASS)
    return np.concatenate(xs), ys, rows


def fit_softmax(x: np.ndarray, y: np.ndarray, weight: np.ndarray, bias: np.ndarray,
                steps: int = FIT_STEPS) -> tuple[np.ndarray, np.ndarray]:
    """Softmax regression by full-batch gradient descent with momentum, from (weight, bias),
    for `steps` steps on the raw embeddings."""
    w, b = weight.astype(np.float64).copy(), bias.astype(np.float64).copy()
    vw, vb = np.zeros_like(w), np.zeros_like(b)
    onehot = np.eye(len(b))[y]
    for _ in range(steps):
        logits = x @ w.T + b
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        err = (p - onehot) / len(y)
        vw = FIT_MOMENTUM * vw + err.T @ x
        vb = FIT_MOMENTUM * vb + err.sum(axis=0)
        w -= FIT_LR * vw
        b -= FIT_LR * vb
    return w, b


def fit_head(x: np.ndarray, y: np.ndarray, weight: np.ndarray, bias: np.ndarray,
             fit: str = "scaled") -> tuple[np.ndarray, np.ndarray]:
    """The head rows fitted to the virtual embeddings (x, y), from the aggregated rows.

    The head does two jobs: it predicts (its direction and offsets decide every argmax), and
    the sites go on training through it (its scale sets how hard their cross-entropy and
    DER++'s stored logits push the backbone). A converged fit predicts best, but its rows
    grow about half again as long as a short fit's, and sites that train on them wreck the
    backbone (5 sites fell to 8-17 % after round 3); a short fit keeps them stable but stops
    far from the best direction. `scaled` (the default): the converged fit
    (CONVERGED_STEPS) scaled down to the mean row norm of the short fit (FIT_STEPS);
    scaling weight and bias together changes no prediction. `short`: the short fit as it
    stands. Measured in docs/federation.md, "Head calibration"."""
    if fit not in FITS:
        raise ValueError(f"fit must be one of {', '.join(FITS)}, not {fit!r}")
    w, b = fit_softmax(x, y, weight, bias, FIT_STEPS)
    if fit == "short":
        return w, b
    target = np.linalg.norm(w, axis=1).mean()
    w, b = fit_softmax(x, y, weight, bias, CONVERGED_STEPS)
    scale = target / max(np.linalg.norm(w, axis=1).mean(), 1e-12)
    return w * scale, b * scale


def calibrate_head(labels: list, weight: np.ndarray, bias: np.ndarray,
                   reports: list[ClassStats], seed: int = 0, fit: str = "scaled"
                   ) -> tuple[np.ndarray, np.ndarray, list]:
    """The head (`weight`, `bias`: rows in `labels` order) refitted on the sites' class
    statistics (`fit`: see fit_head). Returns the new weight and bias (same shapes and
    dtypes) and the labels that were refitted; with fewer than two reported labels nothing
    is refitted."""
    pooled = pool(reports)
    new_w, new_b = weight.copy(), bias.copy()
    if sum(label in pooled for label in labels) < 2:
        return new_w, new_b, []
    x, y, rows = virtual_features(pooled, labels, np.random.default_rng([5, seed]))
    w, b = fit_head(x, y, weight[rows], bias[rows], fit)
    new_w[rows] = w.astype(weight.dtype)
    new_b[rows] = b.astype(bias.dtype)
    return new_w, new_b, [labels[i] for i in rows]
