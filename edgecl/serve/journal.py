"""The write-ahead journal: every accepted push is on disk before it is acked.

    STATE/journal/<first stream offset, 20 digits>.wal    one segment per run or per segment_mb

A segment is an 8-byte magic (`EDGECLJ1`) followed by records:

    u32 little-endian  length of the body (1 .. MAX_RECORD_BYTES)
    u32 little-endian  CRC32 of the 4 length bytes and the body
    body               msgpack map {sensor, seq, first, shape, dtype, labels, x}

Only the socket loop appends (plain bytes, no torch). Why each choice:
- A record is one `writev` of header and body, so a process crash (SIGKILL) leaves at most one
  torn record at the very end; the page cache keeps everything written before it.
- The CRC covers the length, so a zero-filled tail (a power cut on some file systems) or a torn
  header reads as corrupt, never as a record. Reading stops at the first bad record of a
  segment, with a log line; `open()` cuts that tail off so appends never follow garbage.
- Each run starts a new segment named by the next stream offset: a segment's records cover
  offsets [its name, the next segment's name), which is what lets a checkpoint remove every
  segment it fully covers without reading it.
- fsync "batch" syncs before every ack (an ack survives a power cut); "interval" syncs every
  `fsync_interval_ms` from a helper thread (faster; a power cut can lose acks of that window,
  a process crash loses nothing).
- A write or sync that fails (disk full, I/O error) cuts the file back to the last whole record
  and raises StorageError: the push is refused, never acked.
"""
from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import msgpack
import numpy as np

from edgecl.config import FSYNC_POLICIES
from edgecl.errors import UserError
from edgecl.files import fsync_dir
from edgecl.serve.queue import Batch
from edgecl.wire import DTYPES, dtype_name

log = logging.getLogger("edgecl.journal")

MAGIC = b"EDGECLJ1"
HEADER = struct.Struct("<II")            # body length, crc32(length bytes + body)
MAX_RECORD_BYTES = 1 << 30               # a larger length field is corruption, not a record
SUFFIX = ".wal"


class StorageError(Exception):
    """The journal could not be written; nothing was accepted."""


@dataclass
class RecordInfo:
    """What the socket loop needs from a journaled push to restore dedup and offsets."""

    sensor: str
    seq: int
    first: int
    n: int
    labels: list


def encode(batch: Batch) -> bytes:
    """One record: header and msgpack body."""
    body = msgpack.packb({"sensor": batch.sensor, "seq": batch.seq, "first": batch.first,
                          "shape": list(batch.x.shape), "dtype": dtype_name(batch.x.dtype),
                          "labels": list(batch.labels),
                          "x": memoryview(np.ascontiguousarray(batch.x)).cast("B")},
                         use_bin_type=True)
    length = struct.pack("<I", len(body))
    return HEADER.pack(len(body), zlib.crc32(body, zlib.crc32(length))) + body


def decode(body: bytes) -> Batch:
    record = msgpack.unpackb(body, raw=False, strict_map_key=False)
    # A writable copy: the learner turns inputs into tensors, which must not alias read-only
    # bytes.
    x = np.frombuffer(bytearray(record["x"]), dtype=DTYPES[record["dtype"]]) \
        .reshape(record["shape"])
    return Batch(record["sensor"], int(record["seq"]), x, list(record["labels"]),
                 first=int(record["first"]))


def decode_all(path: Path, bodies: list[bytes]) -> Iterator[Batch]:
    """Decode records in order; one that passes its CRC but does not decode (written by
    something else) ends the segment with a log line rather than a crash."""
    for i, body in enumerate(bodies):
        try:
            yield decode(body)
        except Exception as exc:
            log.warning("journal %s: record %d does not decode (%s: %s); the rest of this "
                        "segment is skipped", path.name, i, type(exc).__name__, exc)
            return


def read_segment(path: Path) -> tuple[list[bytes], int, str | None]:
    """The record bodies of one segment, the byte length they end at, and why reading stopped
    early (None if the file ended cleanly)."""
    data = path.read_bytes()
    if len(data) < len(MAGIC):
        return [], 0, f"file shorter than its {len(MAGIC)}-byte header"
    if data[:len(MAGIC)] != MAGIC:
        return [], 0, "not a journal segment (bad magic)"
    bodies, pos = [], len(MAGIC)
    view = memoryview(data)
    while pos < len(data):
        if len(data) - pos < HEADER.size:
            return bodies, pos, f"torn record header at byte {pos}"
        length, crc = HEADER.unpack_from(data, pos)
        if not 0 < length <= MAX_RECORD_BYTES:
            return bodies, pos, f"bad record length {length} at byte {pos}"
        end = pos + HEADER.size + length
        if end > len(data):
            return bodies, pos, f"torn record at byte {pos} ({len(data) - pos} of " \
                                f"{HEADER.size + length} bytes)"
        body = view[pos + HEADER.size:end]
        if zlib.crc32(body, zlib.crc32(data[pos:pos + 4])) != crc:
            return bodies, pos, f"CRC mismatch at byte {pos}"
        bodies.append(bytes(body))
        pos = end
    return bodies, pos, None


class Journal:
    """Segments under `directory`: appended by the socket loop, read back at restart, pruned
    behind checkpoints by the learner thread (the segment list is guarded by a lock)."""

    def __init__(self, directory: str | os.PathLike, fsync: str = "batch",
                 fsync_interval_ms: int = 50, segment_bytes: int = 8 << 20):
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}, got {fsync!r}")
        self.directory = Path(directory)
        self.fsync = fsync
        self.fsync_interval_s = fsync_interval_ms / 1000
        self.segment_bytes = int(segment_bytes)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0                     # bytes of whole records in the open segment
        self._dirty = False                # written since the last fsync
        self._stop = threading.Event()
        self._syncer: threading.Thread | None = None
        self.last_error: str | None = None
        self._listing, self._listed_at = (0, 0), float("-inf")

    # -- startup ----------------------------------------------------------------------------

    def open(self, covered: int = 0) -> tuple[int, list[RecordInfo]]:
        """Check every segment (cutting off a torn or corrupt tail, with a log line), open a
        fresh segment for this run. Returns the next stream offset and the records at or after
        `covered` (for dedup and counters). A state dir that cannot be written is a UserError."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            next_offset, records = covered, []
            for path in self.segments():
                bodies, good, problem = read_segment(path)
                if problem is not None:
                    log.warning("journal %s: %s; reading stops there, cutting off %d bytes "
                                "(an unacked push torn by a crash, or damage)", path.name,
                                problem, path.stat().st_size - good)
                    self._cut(path, good)
                for batch in decode_all(path, bodies):
                    next_offset = max(next_offset, batch.first + batch.n)
                    if batch.first >= covered:
                        records.append(RecordInfo(batch.sensor, batch.seq, batch.first,
                                                  batch.n, batch.labels))
            self._start_segment(next_offset)
        except OSError as exc:
            raise UserError(f"cannot use the journal in {self.directory}: "
                            f"{exc.strerror or exc}") from None
        return next_offset, records

    @staticmethod
    def _cut(path: Path, good: int) -> None:
        if good < len(MAGIC):
            path.unlink()
            return
        with open(path, "r+b") as fh:
            fh.truncate(good)
            fh.flush()
            os.fsync(fh.fileno())

    def segments(self) -> list[Path]:
        """Segment files, oldest first."""
        return sorted(p for p in self.directory.glob(f"*{SUFFIX}")
                      if p.stem.isdigit())

    # -- appending (socket loop) ------------------------------------------------------------

    def append(self, batch: Batch) -> None:
        """Write one accepted push; with fsync "batch", also sync it. Raises StorageError and
        leaves the file as it was if anything fails."""
        record = encode(batch)
        with self._lock:
            try:
                if self._fd is None or self._size >= self.segment_bytes:
                    self._start_segment(batch.first)
                _write_all(self._fd, record)
                if self.fsync == "batch":
                    os.fsync(self._fd)
                else:
                    self._dirty = True
            except OSError as exc:
                self._undo(exc)
                raise StorageError(self.last_error) from None
            self._size += len(record)
            self.last_error = None
        if self.fsync == "interval" and self._syncer is None:
            self._syncer = threading.Thread(target=self._sync_loop, name="edgecl-journal-sync",
                                            daemon=True)
            self._syncer.start()

    def _start_segment(self, first: int) -> None:
        """Close the current segment (synced) and open `<first>.wal`. Lock held (or startup)."""
        self._close_fd()
        path = self.directory / f"{first:020d}{SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        try:
            _write_all(fd, MAGIC)
            os.fsync(fd)
            fsync_dir(self.directory)
        except OSError:
            os.close(fd)
            raise
        self._fd, self._path, self._size = fd, path, len(MAGIC)

    def _undo(self, exc: OSError) -> None:
        """After a failed write or sync: cut back to the last whole record, or give up this
        segment (the next append starts a new one). Lock held."""
        where = self._path or self.directory
        self.last_error = (f"cannot write the journal {where}: "
                           f"{exc.strerror or errno.errorcode.get(exc.errno, exc)}")
        log.error("%s; refusing pushes until a write succeeds", self.last_error)
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, self._size)
        except OSError:
            self._close_fd(sync=False)

    def _sync_loop(self) -> None:
        while not self._stop.wait(self.fsync_interval_s):
            self.sync()

    def sync(self) -> None:
        """fsync what was written since the last sync (the "interval" policy's thread). The
        sync runs on a duplicate descriptor outside the lock, so appends do not wait for it."""
        with self._lock:
            if not self._dirty or self._fd is None:
                return
            fd, path = os.dup(self._fd), self._path
            self._dirty = False
        try:
            os.fsync(fd)
        except OSError as exc:
            # Acks already sent may not be on disk; all that can be done is say so, and start
            # a fresh segment for what comes next.
            with self._lock:
                self.last_error = f"cannot sync the journal {path}: {exc.strerror or exc}"
                log.error("%s; acks of the last %d ms may not survive a power cut",
                          self.last_error, self.fsync_interval_s * 1000)
                if self._path == path:
                    self._close_fd(sync=False)
        finally:
            os.close(fd)

    def _close_fd(self, sync: bool = True) -> None:
        if self._fd is None:
            return
        try:
            if sync and self._dirty:
                os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd, self._path, self._dirty = None, None, False

    def close(self) -> None:
        self._stop.set()
        if self._syncer is not None:
            self._syncer.join(5)
        with self._lock:
            try:
                self._close_fd()
            except OSError as exc:
                log.error("journal: final fsync failed: %s", exc.strerror or exc)

    # -- reading and pruning (learner thread) ------------------------------------------------

    def records(self, start: int = 0, end: int | None = None) -> Iterator[Batch]:
        """Journaled pushes with `start <= first < end`, in stream order."""
        for path in self.segments():
            if end is not None and int(path.stem) >= end:
                return
            bodies, _, problem = read_segment(path)
            if problem is not None:
                log.warning("journal %s: %s; the rest of this segment is skipped",
                            path.name, problem)
            for batch in decode_all(path, bodies):
                if end is not None and batch.first >= end:
                    return
                if batch.first >= start:
                    yield batch

    def remove_covered(self, offset: int) -> int:
        """Delete closed segments whose every record ends at or before `offset`: a segment
        ends where the next one starts. Returns how many were removed."""
        removed = 0
        with self._lock:
            paths = self.segments()
            for path, following in zip(paths, paths[1:]):
                if int(following.stem) > offset or path == self._path:
                    break
                path.unlink()
                removed += 1
        if removed:
            fsync_dir(self.directory)
        return removed

    def stats(self) -> dict:
        """For status (any thread, often): the error is live, the directory is listed at most
        once a second."""
        now = time.monotonic()
        if now - self._listed_at > 1.0:
            sizes = []
            for path in self.segments():
                try:
                    sizes.append(path.stat().st_size)
                except FileNotFoundError:  # removed behind a checkpoint meanwhile
                    pass
            self._listing, self._listed_at = (len(sizes), sum(sizes)), now
        return {"fsync": self.fsync, "segments": self._listing[0], "bytes": self._listing[1],
                "error": self.last_error}


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class DurableCounter:
    """A count in its own small file, rewritten in place (one `pwrite` of a fixed-width line)
    whenever it changes, so it survives a crash at any moment rather than only from one
    checkpoint to the next. Synced before `set` returns when `fsync` is true.

    Used for counts no journal record carries (pushes answered `duplicate: true`). A failed
    write is logged, not raised: the count is a statistic, never a reason to refuse a push."""

    WIDTH = 20

    def __init__(self, path: str | os.PathLike, fsync: bool = True):
        self.path = Path(path)
        self.fsync = fsync
        self._fd: int | None = None
        self.value = self._read()

    def _read(self) -> int:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return 0
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("%s does not read back (%s); counting from the checkpoint", self.path,
                        exc)
            return 0
        if not text.strip().isdigit():
            log.warning("%s holds %r, not a count; counting from the checkpoint", self.path,
                        text[:40])
            return 0
        return int(text)

    def set(self, value: int) -> None:
        self.value = int(value)
        line = f"{self.value:0{self.WIDTH}d}\n".encode()
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
            os.pwrite(self._fd, line, 0)
            if self.fsync:
                os.fsync(self._fd)
        except OSError as exc:
            log.error("cannot write %s (%s); the count is kept in memory and in the next "
                      "checkpoint", self.path, exc.strerror or exc)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
