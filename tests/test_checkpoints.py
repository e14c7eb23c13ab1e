"""Checkpoint files on their own: atomic writes, the last two kept, damaged ones skipped."""
from __future__ import annotations

import logging
import os
import re

import numpy as np
import pytest
import torch

from edgecl.errors import UserError
from edgecl.export import snapshots
from edgecl.learn import LearnerConfig, OnlineLearner
from edgecl.serve.checkpoints import (FORMAT, HEAD, LEGACY_FORMAT, LEGACY_MAGIC, MAGIC,
                                     CheckpointRefused, CheckpointStore, read_checkpoint)


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


# ------------------------------------------------------------------ checkpoints cannot run code

class _Planted:
    """What an attacker with write access to the state directory would pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path, obj, magic=MAGIC) -> None:
    """A file with a valid header and digest (anyone can compute a sha256) around `obj`."""
    import hashlib
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    path.write_bytes(HEAD.pack(magic, len(payload), hashlib.sha256(payload).digest()) + payload)


@pytest.mark.parametrize("magic", [MAGIC, LEGACY_MAGIC])
def test_a_planted_pickle_is_refused_with_one_line_and_never_runs(tmp_path, magic):
    marker = tmp_path / "PWNED"
    path = tmp_path / f"{7:020d}.ckpt"
    plant(path, {"format": FORMAT, "covered": 7, "learner": _Planted(marker)}, magic)
    with pytest.raises(CheckpointRefused) as caught:
        read_checkpoint(path)
    message = str(caught.value)
    assert "\n" not in message and "posix.system" in message and "refused" in message
    assert not marker.exists(), "the planted pickle ran"


def test_numpy_and_plain_containers_round_trip_without_pickle(tmp_path):
    from collections import Counter, OrderedDict
    rng = np.random.default_rng(3)
    value = {"u8": rng.integers(0, 256, (3, 1, 2, 2), dtype=np.uint8),
             "f32": rng.random((2, 3), dtype=np.float32), "big": np.arange(4, dtype=">i4"),
             "strings": np.array(["a", "bc"]), "empty": np.zeros((0, 3)),
             "scalars": [np.int64(3), np.float32(1.5), np.float64(2.5), np.bool_(True),
                         np.str_("x")],
             "rng": rng.bit_generator.state, "slots": [(0, np.ones(2), 1), ("a", None, 0)],
             "sets": ({1, 2}, frozenset({"a"})), "counts": Counter(a=2),
             "ordered": OrderedDict(b=1), "tensor": torch.arange(3), 5: b"bytes"}
    store = CheckpointStore(tmp_path)
    path, _ = store.save({"format": FORMAT, "covered": 1, "value": value})
    loaded = read_checkpoint(path)["value"]
    for key in ("u8", "f32", "big", "strings", "empty"):
        assert loaded[key].dtype == value[key].dtype and loaded[key].flags.writeable
        np.testing.assert_array_equal(loaded[key], value[key])
    assert [type(v) for v in loaded["scalars"]] == [type(v) for v in value["scalars"]]
    assert loaded["scalars"] == value["scalars"] and loaded["rng"] == value["rng"]
    assert loaded["sets"] == value["sets"] and type(loaded["counts"]) is Counter
    assert type(loaded["ordered"]) is OrderedDict and loaded[5] == b"bytes"
    np.testing.assert_array_equal(loaded["slots"][0][1], np.ones(2))
    assert torch.equal(loaded["tensor"], value["tensor"])


def test_a_type_outside_the_allow_list_is_refused_when_saving(tmp_path):
    from collections import deque
    store = CheckpointStore(tmp_path)
    for bad, where in ((deque([1]), "state['learner']['queue']"),
                       (np.array([object()]), "state['learner']['queue']"),
                       (_Planted(tmp_path / "x"), "state['learner']['queue']")):
        with pytest.raises(TypeError, match=re.escape(where)):
            store.save({"format": FORMAT, "covered": 1, "learner": {"queue": bad}})
    assert store.paths() == []


def legacy_encode(state: dict) -> bytes:
    """What edgecl wrote before EDGECLC2: numpy objects pickled as such, format 1."""
    import hashlib
    import io
    buf = io.BytesIO()
    torch.save({**state, "format": LEGACY_FORMAT}, buf)
    payload = buf.getvalue()
    return HEAD.pack(LEGACY_MAGIC, len(payload), hashlib.sha256(payload).digest()) + payload


def test_a_checkpoint_written_before_still_loads(tmp_path):
    rng = np.random.default_rng(0)
    old = {"covered": 4, "parts": {"heldout": {"rng": rng.bit_generator.state, "slots": [
        (0, rng.random((2, 1, 8, 8), dtype=np.float32), 2)], "n": np.int64(4)}}}
    path = tmp_path / f"{4:020d}.ckpt"
    path.write_bytes(legacy_encode(old))
    loaded = read_checkpoint(path)
    assert loaded["format"] == LEGACY_FORMAT and loaded["covered"] == 4
    np.testing.assert_array_equal(loaded["parts"]["heldout"]["slots"][0][1],
                                  old["parts"]["heldout"]["slots"][0][1])
    assert loaded["parts"]["heldout"]["rng"] == old["parts"]["heldout"]["rng"]
