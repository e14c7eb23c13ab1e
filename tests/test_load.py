"""Load: 8 sensors push at once, through a link that loses replies, into a daemon whose queue is
small enough to answer `busy`. Every sample must be acked and learned exactly once, and the
daemon's memory must stay bounded.

The full-scale test (8 x 5,000) uses a RecordingLearner, which checks "exactly once" per sample
id; with the real OnlineLearner, 40,000 samples take minutes of training on a 2-core machine,
so the real learner gets a smaller run here and the full scale in benchmarks/load.py.
"""
from __future__ import annotations

import torch

from edgecl.client import get_status
from edgecl.config import Config
from edgecl.serve.daemon import Daemon
from load_sensors import (LossyProxy, RecordingLearner, RssSampler, push_concurrently,
                          sample_ids, sensor_data, wait_until)

SENSORS = 8
SAMPLES = 5000
BATCH = 50
SHAPE = (1, 8, 8)
# Growth allowed while 40,000 samples pass through. A leak of every accepted frame would be
# 40,000 x 64 B of pixels plus ~1 KB of bookkeeping per push, far less than this bound, which
# is a guard against unbounded growth (a queue or dedup record that is never trimmed), not a
# claim about how little memory edgecl uses.
RSS_GROWTH_BOUND = 150 * 2**20


def load_config(tmp_path) -> Config:
    config = Config()
    config.serve.port = 0
    config.serve.bind = "127.0.0.1"
    config.serve.state_dir = str(tmp_path / "state")
    config.serve.stats_interval_s = 0.05
    config.serve.queue_mb = 0.125       # 2,048 samples of 8x8: sensors meet `busy`
    config.serve.retry_after_ms = 20
    config.serve.learn_batch = 250
    config.input.channels, config.input.height, config.input.width = SHAPE
    config.input.dtype = "uint8"
    config.snapshots.enabled = False
    config.learner = {"buffer_size": 0, "method": "finetune", "threads": 1, "seed": 0,
                      "min_final_map": 1, "channels_last": False}
    return config


def test_eight_sensors_every_sample_acked_and_learned_exactly_once(tmp_path):
    learner = RecordingLearner(step_s=0.05)  # 5,000 samples/s: sensors outrun it
    daemon = Daemon(load_config(tmp_path), learner=learner).start()
    try:
        rss = RssSampler()
        proxy = LossyProxy(daemon.address, drop_every=37)
        try:
            results = push_concurrently(proxy.address, SENSORS, SAMPLES, BATCH, SHAPE)
        finally:
            proxy.close()
        total = SENSORS * SAMPLES
        wait_until(lambda: get_status(daemon.address)["samples_learned"] >= total, 30,
                   "every acked sample to be learned")
        peak = rss.stop()
        status = get_status(daemon.address)
    finally:
        daemon.stop()
        daemon.stop()
        assert daemon.join(30) is not None

    assert [r.error for r in results] == [None] * SENSORS
    assert all(r.stats.acked_samples == SAMPLES for r in results)
    # the link really lost replies, sensors really resent, and the daemon really said busy
    assert proxy.dropped > 0 and sum(r.stats.retried for r in results) > 0
    busy_seen = sum(r.stats.busy for r in results)  # the proxy may have dropped some
    assert busy_seen > 0 and 0 <= status["refused"]["busy"] - busy_seen <= proxy.dropped
    assert status["samples_received"] == status["samples_learned"] == total
    assert status["samples_duplicate"] >= BATCH * sum(r.stats.duplicates for r in results) > 0
    everything = {int(i) for s in range(SENSORS)
                  for i in sample_ids(sensor_data(s, SAMPLES, SHAPE, 4)[0])}
    assert set(learner.seen) == everything, "a sample was lost"
    assert max(learner.seen.values()) == 1, "a sample was learned twice"
    assert status["queue_depth"] == 0 and status["queue_bytes"] == 0
    assert peak - rss.start_rss < RSS_GROWTH_BOUND, \
        f"RSS grew by {(peak - rss.start_rss) / 2**20:.0f} MiB"


def test_the_real_learner_learns_every_acked_sample_under_load(tmp_path, run_daemons):
    daemon = run_daemons(load_config(tmp_path))
    proxy = LossyProxy(daemon.address, drop_every=11)
    try:
        results = push_concurrently(proxy.address, SENSORS, 125, 25, SHAPE)
    finally:
        proxy.close()
    total = SENSORS * 125
    assert [r.error for r in results] == [None] * SENSORS
    assert sum(r.stats.acked_samples for r in results) == total
    assert sum(r.stats.retried for r in results) > 0
    wait_until(lambda: get_status(daemon.address)["samples_learned"] >= total, 120,
               "every acked sample to be learned")
    status = get_status(daemon.address)
    assert status["samples_received"] == status["samples_learned"] == total
    assert status["samples_failed"] == 0 and status["n_classes"] == 4
    assert all(torch.isfinite(p).all() for p in daemon.learner.student.parameters())
