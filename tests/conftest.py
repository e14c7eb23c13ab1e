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
