import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    np.random.seed(0)
    yield


@pytest.fixture
def digits():
    """A small class-incremental slice of the real MNIST-5k digits: 40 per class, 0..3."""
    from edgecl.data import split_mnist
    s = split_mnist(seed=0, tasks=[(0, 1), (2, 3)])
    keep = np.concatenate([np.flatnonzero(s.train_y == c)[:40] for c in (0, 1, 2, 3)])
    keep.sort()
    return s.train_x[keep], s.train_y[keep]


@pytest.fixture
def run_daemons():
    """Start daemons from configs; every one is stopped and joined at the end of the test."""
    from edgecl.serve.daemon import Daemon

    started = []

    def start(config):
        daemon = Daemon(config).start()
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()
        daemon.stop()  # abandon whatever a test left queued: do not wait for learning
        assert daemon.join(30) is not None, "daemon thread did not stop"
