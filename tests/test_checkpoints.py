"""Checkpoint files on their own: atomic writes, the last two kept, damaged ones skipped."""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch

from edgecl.errors import UserError
from edgecl.export import snapshots
from edgecl.learn import LearnerConfig, OnlineLearner
from edgecl.serve.checkpoints import FORMAT, CheckpointStore, read_checkpoint


def state(covered: int, learner: OnlineLearner | None = None) -> dict:
    return {"format": FORMAT, "covered": covered,
            "learner": None if learner is None else learner.state_dict()}


def test_a_learner_round_trips_exactly(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (40, 1, 8, 8), dtype=np.uint8)
    y = [i % 3 for i in range(40)]
    learner = OnlineLearner(LearnerConfig(method="derpp+ewcpp", buffer_size=10, threads=1))
    for start in range(0, 30, 10):
        learner.learn_many(x[start:start + 10], y[start:start + 10])
    store = CheckpointStore(tmp_path)
    path, size = store.save(state(30, learner))
    assert path.name == f"{30:020d}.ckpt" and size == path.stat().st_size
    loaded, loaded_path = store.load_newest()
    twin = OnlineLearner(LearnerConfig(method="derpp+ewcpp", buffer_size=10, threads=1))
    twin.load_state_dict(loaded["learner"])
    # Both learn the same next batch from the same state: identical weights after. The torch
    # RNG is process-wide (one learner per daemon), so each starts from the saved one.
    learner.learn_many(x[30:], y[30:])
    torch.set_rng_state(loaded["learner"]["torch_rng"])
    twin.learn_many(x[30:], y[30:])
    for a, b in zip(learner.student.state_dict().values(), twin.student.state_dict().values()):
        assert torch.equal(a, b)
    assert twin.labels == learner.labels and twin.samples_learned == learner.samples_learned


def test_only_the_last_two_are_kept(tmp_path):
    store = CheckpointStore(tmp_path)
    for covered in (10, 20, 30, 40):
        store.save(state(covered))
    assert [int(p.stem) for p in store.paths()] == [30, 40]
    assert store.oldest_covered() == 30


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "empty"])
def test_a_damaged_newest_falls_back_to_the_older_one(tmp_path, caplog, damage):
    store = CheckpointStore(tmp_path)
    store.save(state(10))
    newest, _ = store.save(state(20))
    data = bytearray(newest.read_bytes())
    if damage == "flipped byte":
        data[-10] ^= 0x01
    elif damage == "truncated":
        data = data[:len(data) // 2]
    else:
        data = bytearray()
    newest.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, "edgecl.checkpoints"):
        loaded, path = store.load_newest()
    assert loaded["covered"] == 10 and path.name == f"{10:020d}.ckpt"
    assert newest.name in caplog.text and "does not read back" in caplog.text


def test_none_whole_is_a_user_error_and_none_at_all_is_a_fresh_start(tmp_path):
    store = CheckpointStore(tmp_path)
    assert store.load_newest() is None
    path, _ = store.save(state(10))
    path.write_bytes(b"EDGECLC1 but nothing after")
    with pytest.raises(UserError, match="no checkpoint .* reads back whole"):
        store.load_newest()


def test_a_crash_mid_write_leaves_the_previous_checkpoint_and_no_partial_file(tmp_path,
                                                                              monkeypatch):
    store = CheckpointStore(tmp_path)
    store.save(state(10))

    def crash(src, dst):
        raise OSError("killed before the rename")

    monkeypatch.setattr(snapshots.os, "replace", crash)
    with pytest.raises(OSError):
        store.save(state(20))
    monkeypatch.undo()
    assert [p.name for p in store.paths()] == [f"{10:020d}.ckpt"]
    assert any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())  # the torn write
    reopened = CheckpointStore(tmp_path)  # a restart sweeps it
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
    assert reopened.load_newest()[0]["covered"] == 10


def test_read_checkpoint_checks_the_digest_before_unpickling(tmp_path):
    store = CheckpointStore(tmp_path)
    path, _ = store.save(state(5))
    data = bytearray(path.read_bytes())
    data[20] ^= 0xFF  # inside the stored sha256
    path.write_bytes(bytes(data))
    with pytest.raises(Exception, match="sha256 mismatch"):
        read_checkpoint(path)
    assert os.path.getsize(path) == len(data)
