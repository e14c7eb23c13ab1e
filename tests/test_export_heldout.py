"""The held-out slice: 1 in `every` per class, never trained on, class-balanced reservoir."""
from __future__ import annotations

import numpy as np
import pytest

from edgecl.export.heldout import HeldOutSlice


def stream(n_per_class: dict, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = [k for k, n in n_per_class.items() for _ in range(n)]
    labels = [labels[i] for i in rng.permutation(len(labels))]
    x = np.arange(len(labels), dtype=np.uint16).reshape(-1, 1, 1, 1)  # sample id as pixel
    return x, labels


def test_one_in_every_per_class_is_held_out_and_never_returned_for_training():
    x, y = stream({"cat": 200, "dog": 40, 7: 19})
    h = HeldOutSlice(every=20, per_class=100, seed=0)
    masks = [h.offer(x[i:i + 16], y[i:i + 16]) for i in range(0, len(y), 16)]
    mask = np.concatenate(masks)
    held = {k: sum(1 for v, m in zip(y, mask) if m and v == k) for k in ("cat", "dog", 7)}
    assert held == {"cat": 10, "dog": 2, 7: 0}
    hx, hy = h.arrays()
    assert sorted(hx.ravel().tolist()) == sorted(x[mask].ravel().tolist())
    assert not set(hx.ravel().tolist()) & set(x[~mask].ravel().tolist())
    assert len(h) == 12 and sorted(map(str, hy)) == ["cat"] * 10 + ["dog"] * 2


def test_reservoir_keeps_classes_balanced_and_spread_over_the_stream():
    x, y = stream({"a": 4000, "b": 400})
    h = HeldOutSlice(every=20, per_class=10, seed=1)
    h.offer(x, y)
    assert h.class_counts() == {"a": 10, "b": 10} or h.class_counts() == {"b": 10, "a": 10}
    hx, hy = h.arrays()
    a_ids = np.sort(hx[np.array(hy) == "a"].ravel())
    # a reservoir over 200 diverted samples, not the first 10 of them
    assert a_ids.max() > np.sort(x[np.array(y) == "a"].ravel())[20 * 10 * 4]


def test_numpy_and_python_labels_are_one_class():
    h = HeldOutSlice(every=2, per_class=5)
    h.offer(np.zeros((4, 1, 2, 2), np.uint8), [3, np.int64(3), 3, np.int32(3)])
    assert h.class_counts() == {3: 2}


def test_state_dict_round_trip_continues_identically():
    x, y = stream({"a": 300, "b": 300})
    one, two = HeldOutSlice(every=5, per_class=4, seed=3), HeldOutSlice(seed=9)
    one.offer(x[:200], y[:200])
    two.load_state_dict(one.state_dict())
    m1, m2 = one.offer(x[200:], y[200:]), two.offer(x[200:], y[200:])
    assert np.array_equal(m1, m2)
    (x1, y1), (x2, y2) = one.arrays(), two.arrays()
    assert np.array_equal(x1, x2) and y1 == y2


def test_empty_and_bad_arguments():
    assert HeldOutSlice().arrays() == (None, [])
    with pytest.raises(ValueError):
        HeldOutSlice(every=1)
    with pytest.raises(ValueError, match="labels"):
        HeldOutSlice().offer(np.zeros((2, 1, 1, 1)), [1])
