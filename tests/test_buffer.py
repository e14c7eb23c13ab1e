import numpy as np
import pytest

from edgecl.learn.buffer import ReservoirBuffer


def test_reservoir_keeps_each_sample_with_probability_k_over_n():
    k, n, trials = 20, 200, 2000
    counts = np.zeros(n)
    rng = np.random.default_rng(0)
    for _ in range(trials):
        buf = ReservoirBuffer(k, rng)
        ids = np.arange(n)
        for start in range(0, n, 10):
            chunk = ids[start:start + 10]
            buf.add(chunk.reshape(-1, 1, 1, 1).astype(np.float32), chunk, np.zeros((10, 2)))
        counts[buf.x[:, 0, 0, 0].astype(int)] += 1
    p = k / n
    expected = trials * p
    sd = np.sqrt(trials * p * (1 - p))
    # every sample's inclusion count within 5 sd of K/n, and the total exactly K per trial
    assert np.all(np.abs(counts - expected) < 5 * sd)
    assert counts.sum() == trials * k
    # early and late halves of the stream are equally represented (no recency bias)
    half_sd = sd / np.sqrt(n // 2)
    assert abs(counts[: n // 2].mean() - counts[n // 2:].mean()) < 5 * np.sqrt(2) * half_sd


def test_buffer_stores_uint8_and_reports_bytes():
    buf = ReservoirBuffer(10, np.random.default_rng(0))
    x = np.zeros((4, 1, 28, 28), np.uint8)
    buf.add(x, np.arange(4), np.ones((4, 2), np.float32))
    assert buf.x.dtype == np.uint8 and len(buf) == 4
    assert buf.nbytes() == 10 * 784 + 10 * 8 + 10 * 2 * 4 + 10 * 8


def test_logits_widen_and_remember_their_width():
    buf = ReservoirBuffer(4, np.random.default_rng(0))
    buf.add(np.zeros((2, 1, 2, 2), np.uint8), np.array([0, 1]), np.ones((2, 2)))
    buf.add(np.zeros((2, 1, 2, 2), np.uint8), np.array([2, 2]), np.full((2, 3), 2.0))
    x, y, logits, width = buf.get(np.arange(4))
    assert logits.shape == (4, 3)
    assert width.tolist() == [2, 2, 3, 3]
    assert logits[0].tolist() == [1, 1, 0]


def test_zero_capacity_buffer_stays_empty():
    buf = ReservoirBuffer(0, np.random.default_rng(0))
    buf.add(np.zeros((3, 1, 2, 2), np.uint8), np.arange(3), np.zeros((3, 2)))
    assert len(buf) == 0 and buf.seen == 3


def test_state_round_trip():
    buf = ReservoirBuffer(5, np.random.default_rng(0))
    buf.add(np.arange(8, dtype=np.uint8).reshape(8, 1, 1, 1), np.arange(8), np.ones((8, 2)))
    other = ReservoirBuffer(1, np.random.default_rng(1))
    other.load_state_dict(buf.state_dict())
    assert other.seen == 8 and len(other) == 5
    np.testing.assert_array_equal(other.x, buf.x)
    np.testing.assert_array_equal(other.logit_width, buf.logit_width)


def _offer(buf, labels):
    labels = np.asarray(labels)
    for start in range(0, len(labels), 10):
        chunk = labels[start:start + 10]
        buf.add(chunk.reshape(-1, 1, 1, 1).astype(np.uint8), chunk, np.zeros((len(chunk), 2)))


def test_balanced_buffer_keeps_a_rare_class_that_reservoir_loses():
    # 1,000 samples of class 0, then 20 of class 1: a 40-slot reservoir keeps about
    # 40 * 20 / 1020 < 1 of class 1; CBRS gives the newcomer room taken from the largest class
    stream = [0] * 1000 + [1] * 20
    reservoir = ReservoirBuffer(40, np.random.default_rng(0))
    balanced = ReservoirBuffer(40, np.random.default_rng(0), balanced=True)
    _offer(reservoir, stream)
    _offer(balanced, stream)
    assert np.bincount(reservoir.y, minlength=2)[1] <= 3
    assert np.bincount(balanced.y, minlength=2).tolist() == [20, 20]
    assert len(balanced) == 40 and balanced.seen == 1020


def test_balanced_buffer_on_a_class_incremental_stream_stays_balanced():
    stream = np.repeat(np.arange(5), 200)  # five classes, one after another
    buf = ReservoirBuffer(50, np.random.default_rng(1), balanced=True)
    _offer(buf, stream)
    assert np.bincount(buf.y, minlength=5).tolist() == [10] * 5
    # the class counts survive a checkpoint
    state = buf.state_dict()
    twin = ReservoirBuffer(50, np.random.default_rng(1), balanced=True)
    twin.load_state_dict(state)
    assert twin.class_seen.tolist() == [200] * 5 and twin.full_classes.all()
