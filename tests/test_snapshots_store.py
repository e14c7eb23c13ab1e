"""The versioned snapshot store: atomic publish, monotonic versions, retention, integrity."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from edgecl.errors import UserError
from edgecl.export.onnx import ParityThresholds, export_student
from edgecl.export.snapshots import (FP32_FILE, INT8_FILE, META_FILE, SnapshotCorrupt,
                                     SnapshotRejected, SnapshotStore, sha256_bytes)
from export_helpers import CLASSES, SHAPE, blob_images, fitted_student

NAMES = [f"class-{k}" for k in range(CLASSES)]


def files(tag: str) -> dict:
    return {FP32_FILE: f"fp32 model {tag}".encode(), INT8_FILE: f"int8 model {tag}".encode()}


@pytest.fixture(scope="module")
def exports():
    """One real export that passes the gate and one that a strict gate rejects."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, y = blob_images(16, seed=0)
        model = fitted_student(x, y, NAMES)
        hx, hy = blob_images(8, seed=1)
        good = export_student(model, NAMES, SHAPE, x, hx, hy)
        bad = export_student(model, NAMES, SHAPE, x, hx, hy,
                             thresholds=ParityThresholds(max_abs_logit=-1.0))
    finally:
        torch.set_num_threads(threads)
    return good, bad


def test_publish_writes_files_and_meta_with_sha256(tmp_path, exports):
    good, _ = exports
    store = SnapshotStore(tmp_path / "snapshots")
    v = store.publish_export(good, samples_learned=123)
    assert v == 1 and store.latest() == 1
    meta = json.loads((tmp_path / "snapshots" / "1" / META_FILE).read_text())
    assert meta["version"] == 1 and meta["parent"] is None
    assert meta["labels"] == NAMES and meta["samples_learned"] == 123
    assert meta["input"]["dtype"] == "uint8" and meta["normalization"]["in_graph"]
    assert meta["heldout"]["n"] == 8 * CLASSES
    assert set(meta["heldout"]["per_class_int8"]) == set(NAMES)
    for name, blob in ((FP32_FILE, good.fp32), (INT8_FILE, good.int8)):
        info = meta["files"][name]
        assert info["sha256"] == sha256_bytes(blob) and info["bytes"] == len(blob)
        assert info["memory"]["peak_activation_bytes"] > 0
        assert (tmp_path / "snapshots" / "1" / name).read_bytes() == blob
    assert store.verify(1)["version"] == 1
    assert store.publish(files("b"), {}) == 2
    assert store.meta()["parent"] == 1


def test_parity_failure_blocks_publishing_and_shows_in_status(tmp_path, exports):
    _, bad = exports
    store = SnapshotStore(tmp_path)
    with pytest.raises(SnapshotRejected, match="max \\|dlogit\\|"):
        store.publish_export(bad, samples_learned=50)
    assert store.versions() == [] and store.latest() is None
    assert [p.name for p in tmp_path.iterdir() if p.name.isdigit()] == []
    status = store.status()
    assert status["latest"] is None
    assert status["last_failure"]["samples_learned"] == 50
    assert "max |dlogit|" in status["last_failure"]["failures"][0]


def test_versions_stay_monotonic_across_reopen_prune_and_deletion(tmp_path):
    root = tmp_path / "snapshots"
    store = SnapshotStore(root, keep=2)
    assert [store.publish(files(str(i)), {}) for i in range(3)] == [1, 2, 3]
    assert store.versions() == [2, 3]  # keep=2 pruned version 1
    reopened = SnapshotStore(root, keep=2)
    assert reopened.publish(files("x"), {}) == 4
    for v in reopened.versions():  # even with every version gone, numbers never come back
        shutil.rmtree(root / str(v))
    assert SnapshotStore(root).publish(files("y"), {}) == 5


def test_interrupted_publish_leaves_no_version_and_is_swept(tmp_path):
    root = tmp_path / "snapshots"
    store = SnapshotStore(root)
    store.publish(files("a"), {})
    (root / ".tmp-2").mkdir()
    (root / ".tmp-2" / FP32_FILE).write_bytes(b"half a model")
    assert store.versions() == [1]
    reopened = SnapshotStore(root)
    assert not (root / ".tmp-2").exists()
    assert reopened.publish(files("b"), {}) == 2


def test_tampered_file_is_detected_by_sha256(tmp_path):
    store = SnapshotStore(tmp_path)
    v = store.publish(files("a"), {})
    store.verify(v)
    path = store.path(v, INT8_FILE)
    data = bytearray(path.read_bytes())
    data[3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotCorrupt, match="model.int8.onnx"):
        store.verify(v)
    path.unlink()
    with pytest.raises(SnapshotCorrupt, match="missing"):
        store.verify(v)


def test_rollback_republishes_an_older_version_as_a_newer_one(tmp_path):
    store = SnapshotStore(tmp_path)
    store.publish(files("a"), {"samples_learned": 10})
    store.publish(files("b"), {"samples_learned": 20})
    v = store.rollback()
    assert v == 3
    meta = store.verify(3)
    assert meta["source_version"] == 1 and meta["rollback_of"] == 2 and meta["parent"] == 2
    assert meta["samples_learned"] == 10
    assert store.read(3, INT8_FILE) == files("a")[INT8_FILE]
    assert store.rollback(to=2) == 4 and store.read(4, FP32_FILE) == files("b")[FP32_FILE]


def test_user_mistakes_are_user_errors(tmp_path):
    store = SnapshotStore(tmp_path)
    with pytest.raises(UserError, match="no snapshot"):
        store.meta()
    with pytest.raises(UserError, match="older version"):
        store.rollback()
    store.publish(files("a"), {})
    with pytest.raises(UserError, match="published versions are 1"):
        store.rollback(to=7)
    with pytest.raises(UserError, match="unknown snapshot file"):
        store.read(1, "../secret")
    with pytest.raises(UserError, match="keep"):
        SnapshotStore(tmp_path, keep=0)


def test_read_returns_byte_ranges(tmp_path):
    store = SnapshotStore(tmp_path)
    v = store.publish(files("abcdef"), {})
    blob = files("abcdef")[FP32_FILE]
    assert store.read(v, FP32_FILE, 2, 5) == blob[2:7]
    assert store.read(v, FP32_FILE, len(blob), 5) == b""
