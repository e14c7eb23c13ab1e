"""Head calibration on the sites' class statistics (edgecl/federation/calibrate.py), on
hand-made statistics: pooling, the fit, what is left alone, the Flower records."""
from __future__ import annotations

import numpy as np
import pytest

from edgecl.client.federation import ClassStats
from edgecl.federation.calibrate import (CONVERGED_STEPS, FIT_STEPS, calibrate_head, fit_head,
                                         fit_softmax, pool)

DIM = 6


def directions(f: np.ndarray, rank: int) -> np.ndarray:
    """Principal directions scaled by their standard deviations (as model.stats sends)."""
    _, sv, vt = np.linalg.svd(f - f.mean(0), full_matrices=False)
    out = np.zeros((rank, f.shape[1]))
    k = min(rank, len(sv))
    out[:k] = vt[:k] * (sv[:k, None] / np.sqrt(len(f)))
    return out


def report(labels, samples: dict, rank: int = DIM) -> ClassStats:
    """A site's statistics of the given samples (label -> (n, DIM) array)."""
    return ClassStats(list(labels), [len(samples[k]) for k in labels],
                      np.array([samples[k].mean(0) for k in labels], np.float32),
                      np.array([samples[k].var(0) for k in labels], np.float32),
                      np.array([directions(samples[k], rank) for k in labels], np.float32))


def clusters(rng, centers: dict, n=40, spread=0.3) -> dict:
    return {k: c + spread * rng.standard_normal((n, DIM)) for k, c in centers.items()}


def test_a_class_two_sites_report_is_pooled_as_the_union_of_their_samples():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, (30, DIM)), rng.normal(2, 0.5, (50, DIM))
    pooled = pool([report([7], {7: a}), report([7, "x"], {7: b, "x": b})])
    n, mean, var, comps = pooled[7]
    both = np.concatenate([a, b])
    assert n == 80
    np.testing.assert_allclose(mean, both.mean(0), rtol=1e-5)
    np.testing.assert_allclose(var, both.var(0), rtol=1e-4)
    # full-rank directions: their outer products are the union's covariance
    np.testing.assert_allclose(comps.T @ comps, np.cov(both.T, bias=True), atol=1e-4)
    assert pooled["x"][0] == 50


def test_principal_directions_let_the_head_separate_classes_that_differ_across_a_correlation():
    """Two classes whose dimensions 0 and 1 move together (sd 3) and which differ only along
    (1, -1) by 0.6: per-dimension variances alone make that difference look like noise."""
    rng = np.random.default_rng(4)
    def draw(center, n):
        along = 3.0 * rng.standard_normal((n, 1)) * np.array([1, 1, 0, 0, 0, 0]) / np.sqrt(2)
        return center + along + 0.1 * rng.standard_normal((n, DIM))
    shift = 0.3 * np.array([1, -1, 0, 0, 0, 0])
    train = {0: draw(-shift, 60), 1: draw(shift, 60)}
    test = {0: draw(-shift, 300), 1: draw(shift, 300)}
    weight, bias = np.zeros((2, DIM), np.float32), np.zeros(2, np.float32)
    def accuracy(rank):
        w, b, _ = calibrate_head([0, 1], weight, bias, [report([0, 1], train, rank)])
        return np.mean([np.mean(np.argmax(test[k] @ w.T + b, axis=1) == k) for k in (0, 1)])
    assert accuracy(2) > 0.95
    assert accuracy(0) < accuracy(2) - 0.1


def test_a_head_that_favours_one_class_is_refitted_to_tell_every_class_apart():
    rng = np.random.default_rng(1)
    centers = {label: 2.0 * np.eye(DIM)[i] for i, label in enumerate([0, 1, 2, "cat"])}
    samples = clusters(rng, centers)
    sites = [report([0, 1], samples), report([2, "cat"], samples)]  # disjoint sites
    labels = [0, 1, 2, "cat", "unseen"]
    weight = np.zeros((5, DIM), np.float32)
    bias = np.array([5, 0, 0, 0, -1], np.float32)  # everything is class 0
    new_w, new_b, fitted = calibrate_head(labels, weight, bias, sites, seed=3)
    assert fitted == [0, 1, 2, "cat"]
    assert new_w.dtype == weight.dtype and new_w.shape == weight.shape
    test = clusters(np.random.default_rng(2), centers, n=100)
    for i, label in enumerate(labels[:4]):
        predicted = np.argmax(test[label] @ new_w.T + new_b, axis=1)
        assert np.mean(predicted == i) > 0.95, label
    np.testing.assert_array_equal(new_w[4], weight[4])  # no site reported it: kept
    assert new_b[4] == bias[4]
    again = calibrate_head(labels, weight, bias, sites, seed=3)
    np.testing.assert_array_equal(again[0], new_w)  # seeded: the same fit


def test_the_scaled_fit_predicts_as_the_converged_fit_at_the_short_fits_scale():
    """Classes that differ along a low-variance dimension: the short fit stops before it
    tells them apart, the converged one does, and `scaled` keeps its direction and offsets
    at the short fit's row norm (what the sites go on training through)."""
    rng = np.random.default_rng(6)
    centers = {0: [0, -0.1, 0, 0, 0, 0], 1: [0, 0.1, 0, 0, 0, 0], 2: [4, 0, 0, 0, 0, 0]}
    spread = np.array([1.0, 0.05, 1, 1, 1, 1])
    x = np.concatenate([np.array(c) + spread * rng.standard_normal((200, DIM))
                        for c in centers.values()])
    y = np.repeat(np.arange(3), 200)
    w0, b0 = np.zeros((3, DIM)), np.zeros(3)
    short_w, short_b = fit_head(x, y, w0, b0, "short")
    conv_w, conv_b = fit_softmax(x, y, w0, b0, CONVERGED_STEPS)
    w, b = fit_head(x, y, w0, b0)  # 'scaled', the default
    np.testing.assert_allclose(np.linalg.norm(w, axis=1).mean(),
                               np.linalg.norm(short_w, axis=1).mean(), rtol=1e-9)
    np.testing.assert_array_equal(np.argmax(x @ w.T + b, 1), np.argmax(x @ conv_w.T + conv_b, 1))
    accuracy = lambda w, b: np.mean(np.argmax(x @ w.T + b, 1) == y)
    assert accuracy(w, b) > accuracy(short_w, short_b) + 0.01
    np.testing.assert_array_equal(fit_head(x, y, w0, b0, "short")[0],
                                  fit_softmax(x, y, w0, b0, FIT_STEPS)[0])
    with pytest.raises(ValueError, match="fit must be one of"):
        fit_head(x, y, w0, b0, "long")


def test_with_fewer_than_two_reported_classes_the_head_is_kept():
    rng = np.random.default_rng(0)
    samples = clusters(rng, {0: np.zeros(DIM)})
    weight, bias = rng.normal(size=(2, DIM)).astype(np.float32), np.zeros(2, np.float32)
    new_w, new_b, fitted = calibrate_head([0, 1], weight, bias, [report([0], samples)])
    assert fitted == []
    np.testing.assert_array_equal(new_w, weight)
    np.testing.assert_array_equal(new_b, bias)


def test_class_statistics_survive_the_flower_records():
    pytest.importorskip("flwr")
    from edgecl.federation.records import content_stats, stats_content

    rng = np.random.default_rng(0)
    sent = report([3, "dog"], clusters(rng, {3: np.zeros(DIM), "dog": np.ones(DIM)}))
    back = content_stats(stats_content(sent, "barn"))
    assert (back.labels, back.counts) == ([3, "dog"], [40, 40])
    np.testing.assert_array_equal(back.mean, sent.mean)
    np.testing.assert_array_equal(back.var, sent.var)
    np.testing.assert_array_equal(back.components, sent.components)
    broken = stats_content(ClassStats([3], [1, 2], sent.mean, sent.var, sent.components), "barn")
    with pytest.raises(ValueError, match="disagree"):
        content_stats(broken)
