"""A tiny class-incremental stream for learner tests: one random template per class, noise."""
from __future__ import annotations

import numpy as np


def template_stream(classes, per_class=8, size=12, seed=0, shuffle=False):
    """(x uint8 (N, 1, size, size), y list): `per_class` noisy copies of each class's
    template, classes in order, or interleaved when `shuffle`."""
    rng = np.random.default_rng(seed)
    templates = {c: rng.integers(0, 256, (1, size, size)) for c in range(10)}
    xs, ys = [], []
    for c in classes:
        noise = rng.integers(-40, 40, (per_class, 1, size, size))
        xs.append(np.clip(templates[c] + noise, 0, 255).astype(np.uint8))
        ys += [c] * per_class
    x, y = np.concatenate(xs), np.array(ys)
    if shuffle:
        order = rng.permutation(len(y))
        x, y = x[order], y[order]
    return x, y.tolist()


def learn_in_batches(learner, x, y, batch=8):
    for i in range(0, len(y), batch):
        learner.learn_many(x[i:i + batch], y[i:i + batch])
