"""The write-ahead journal on its own: round trip, torn and corrupt tails, segments, disk errors."""
from __future__ import annotations

import errno
import logging
import os
import time

import numpy as np
import pytest

from edgecl.errors import UserError
from edgecl.serve import journal as journal_mod
from edgecl.serve.journal import MAGIC, Journal, StorageError
from edgecl.serve.queue import Batch

RNG = np.random.default_rng(0)


def make_batches(count: int = 4, n: int = 3) -> list[Batch]:
    batches, first = [], 0
    for i in range(count):
        if i % 2:
            x = RNG.random((n, 1, 4, 4), dtype=np.float32)
            labels = [f"class-{j}" for j in range(n)]
        else:
            x = RNG.integers(0, 256, (n, 1, 4, 4), dtype=np.uint8)
            labels = [j - 1 for j in range(n)]
        batches.append(Batch(f"sensor-{i % 2}", 1000 + i, x, labels, first=first))
        first += n
    return batches


def written(tmp_path, batches, **options) -> Journal:
    journal = Journal(tmp_path / "journal", **options)
    journal.open()
    for batch in batches:
        journal.append(batch)
    journal.close()
    return journal


def assert_same(got: list[Batch], expected: list[Batch]) -> None:
    assert [(b.sensor, b.seq, b.first, b.labels) for b in got] == \
        [(b.sensor, b.seq, b.first, b.labels) for b in expected]
    for g, e in zip(got, expected):
        assert g.x.dtype == e.x.dtype and np.array_equal(g.x, e.x)
        assert g.x.flags.writeable  # the learner may make tensors of it


def test_round_trip_keeps_every_field_and_offsets(tmp_path):
    batches = make_batches()
    written(tmp_path, batches)
    reopened = Journal(tmp_path / "journal")
    next_offset, records = reopened.open(covered=3)
    assert next_offset == 12
    assert [(r.sensor, r.seq, r.first, r.n, r.labels) for r in records] == \
        [(b.sensor, b.seq, b.first, b.n, b.labels) for b in batches[1:]]
    assert_same(list(reopened.records()), batches)
    assert_same(list(reopened.records(start=3, end=9)), batches[1:3])
    reopened.close()


def test_torn_tail_is_cut_off_with_a_log_line_and_appends_follow(tmp_path, caplog):
    batches = make_batches()
    written(tmp_path, batches[:3])
    (segment,) = (tmp_path / "journal").glob("*.wal")
    size = segment.stat().st_size
    with open(segment, "r+b") as fh:
        fh.truncate(size - 5)            # the last record lost its end in a crash
    journal = Journal(tmp_path / "journal")
    with caplog.at_level(logging.WARNING, "edgecl.journal"):
        next_offset, records = journal.open()
    assert "torn record" in caplog.text
    assert next_offset == 6 and len(records) == 2
    journal.append(batches[2])           # the client's resend of the unacked push
    journal.close()
    assert_same(list(Journal(tmp_path / "journal").records()), batches[:3])


@pytest.mark.parametrize("damage", ["crc", "zeros", "length"])
def test_corrupt_record_stops_reading_cleanly(tmp_path, caplog, damage):
    batches = make_batches()
    written(tmp_path, batches)
    (segment,) = (tmp_path / "journal").glob("*.wal")
    data = bytearray(segment.read_bytes())
    record_bytes = len(journal_mod.encode(batches[0]))
    second = len(MAGIC) + record_bytes
    if damage == "crc":
        data[second + 20] ^= 0xFF        # a flipped bit in the second record's body
    elif damage == "zeros":
        data[second:] = bytes(len(data) - second)  # a zero-filled tail after a power cut
    else:
        data[second:second + 4] = (2**31).to_bytes(4, "little")
    segment.write_bytes(bytes(data))
    reader = Journal(tmp_path / "journal")
    with caplog.at_level(logging.WARNING, "edgecl.journal"):
        assert_same(list(reader.records()), batches[:1])
    assert {"crc": "CRC mismatch", "zeros": "bad record length",
            "length": "bad record length"}[damage] in caplog.text


def test_segments_rotate_and_covered_ones_are_removed(tmp_path):
    batches = make_batches(count=8)
    journal = Journal(tmp_path / "journal", segment_bytes=200)
    journal.open()
    for batch in batches:
        journal.append(batch)
    segments = journal.segments()
    assert len(segments) > 2
    starts = [int(p.stem) for p in segments]
    assert starts == sorted(starts) and starts[0] == 0
    assert journal.remove_covered(starts[2]) == 2           # the first two end at starts[2]
    assert journal.remove_covered(10**9) == len(segments) - 3  # never the open one
    assert journal.segments() == segments[-1:]
    assert_same(list(journal.records()), [b for b in batches if b.first >= starts[-1]])
    journal.close()


def test_a_new_run_starts_a_new_segment(tmp_path):
    batches = make_batches()
    written(tmp_path, batches[:2])
    journal = Journal(tmp_path / "journal")
    next_offset, records = journal.open()
    assert next_offset == 6 and len(records) == 2
    journal.append(batches[2])
    journal.close()
    assert [int(p.stem) for p in journal.segments()] == [0, 6]
    assert_same(list(journal.records()), batches[:3])


def test_fsync_batch_syncs_every_append_and_interval_does_not(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(journal_mod.os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    batches = make_batches()
    for policy, inline in (("batch", len(batches)), ("interval", 0)):
        journal = Journal(tmp_path / policy, fsync=policy, fsync_interval_ms=10_000)
        journal.open()
        synced.clear()
        for batch in batches:
            journal.append(batch)
        assert len(synced) == inline, policy
        journal.close()                  # interval: the close syncs what is pending
        assert len(synced) == inline + (policy == "interval")


def test_interval_policy_syncs_in_the_background(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(journal_mod.os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    journal = Journal(tmp_path / "journal", fsync="interval", fsync_interval_ms=20)
    journal.open()
    synced.clear()
    journal.append(make_batches(1)[0])
    for _ in range(200):
        if synced:
            break
        time.sleep(0.01)
    assert synced, "no background fsync within 2 s"
    journal.close()


def test_disk_full_refuses_and_leaves_no_partial_record(tmp_path, monkeypatch):
    batches = make_batches()
    journal = Journal(tmp_path / "journal")
    journal.open()
    journal.append(batches[0])
    (segment,) = journal.segments()
    size = segment.stat().st_size
    real_write = os.write
    calls = []

    def write_half_then_fail(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data)[:len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(journal_mod.os, "write", write_half_then_fail)
    with pytest.raises(StorageError, match="No space left on device"):
        journal.append(batches[1])
    assert segment.stat().st_size == size  # cut back to the last whole record
    assert "No space left" in journal.stats()["error"]
    monkeypatch.setattr(journal_mod.os, "write", real_write)
    journal.append(batches[1])              # the disk has room again
    assert journal.stats()["error"] is None
    journal.close()
    assert_same(list(Journal(tmp_path / "journal").records()), batches[:2])


def test_unwritable_journal_directory_is_a_user_error(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(journal_mod.os, "open", refuse)
    with pytest.raises(UserError, match="cannot use the journal .*Permission denied"):
        Journal(tmp_path / "journal").open()


def test_a_record_that_passes_its_crc_but_does_not_decode_ends_the_segment(tmp_path, caplog):
    import struct
    import zlib

    batches = make_batches(2)
    written(tmp_path, batches[:1])
    (segment,) = (tmp_path / "journal").glob("*.wal")
    body = b"\x93\x01\x02\x03"          # valid msgpack, but a list, not a record
    length = struct.pack("<I", len(body))
    with open(segment, "ab") as fh:
        fh.write(length + struct.pack("<I", zlib.crc32(body, zlib.crc32(length))) + body)
    with caplog.at_level(logging.WARNING, "edgecl.journal"):
        assert_same(list(Journal(tmp_path / "journal").records()), batches[:1])
        reopened = Journal(tmp_path / "journal")
        next_offset, records = reopened.open()
    reopened.close()
    assert "does not decode" in caplog.text and next_offset == 3 and len(records) == 1
