"""Files that are on disk whole or not at all: atomic writes, fsync, sha256, and the names of
a snapshot's files.

A leaf: the standard library and edgecl.errors only, no torch, no numpy. The journal, the
checkpoints, the snapshot store, the time series, the daemon's input spec and the device
client all write through here, so "temporary sibling, fsync, rename, fsync the directory" is
written once.
"""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from edgecl.errors import UserError

# A published snapshot version, and an installed one on a device, is these files.
FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
META_FILE = "meta.json"
MODEL_FILES = (FP32_FILE, INT8_FILE)
# Names starting with this are a write in progress: whoever owns the directory sweeps them.
TMP_PREFIX = ".tmp-"


class SnapshotCorrupt(UserError):
    """A file on disk does not match the sha256 its meta.json records."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync, rename over `path`, fsync the directory: a reader
    (or a restart after a crash) sees the old file or the new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}.{threading.get_ident()}")
    write_synced(tmp, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_synced(path: Path, data: bytes) -> None:
    """Write `path` and fsync it (no rename: for files inside a directory that is itself
    renamed into place once whole)."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def fsync_file(path: Path) -> None:
    """fsync a file written earlier (e.g. appended to in chunks) before it is renamed."""
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    """fsync a directory, so the renames and unlinks in it survive a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
