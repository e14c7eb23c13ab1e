"""Versioned snapshot store, after TensorFlow Serving's layout:

    STATE/snapshots/<version>/{model.onnx, model.int8.onnx, meta.json}

- Versions are integers that only ever increase, across restarts too: the highest version
  ever assigned is kept in `STATE/snapshots/VERSION`, so pruning or rolling back never makes
  a number come back.
- A version is written under a temporary name, every file fsynced, then renamed into place:
  a reader sees a whole version or none.
- The last `keep` versions are kept.
- Rollback republishes an older version's files as a new, higher version, so devices that
  follow "the newest version" pick it up like any other.
- A snapshot whose parity gate failed is never published; the last failure is kept in
  `last_failure.json` for status. When only the int8 checks failed (and `fp32_alone`), the
  fp32 model is published alone: that version has no `model.int8.onnx`, and its meta.json
  says why (`int8`). Devices that run int8 keep the newest version that has one, so pruning
  never removes the newest version with an int8 model.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from edgecl import __version__
from edgecl.errors import UserError
# The file names and the integrity helpers live in the leaf edgecl.files; the names are kept
# here too because callers have always imported them from the store.
from edgecl.files import (FP32_FILE, INT8_FILE, META_FILE, MODEL_FILES, TMP_PREFIX,  # noqa: F401
                          SnapshotCorrupt, fsync_dir, sha256_bytes, sha256_file, write_atomic,
                          write_synced)

log = logging.getLogger(__name__)

COUNTER_FILE = "VERSION"
FAILURE_FILE = "last_failure.json"
TRASH_PREFIX = ".trash-"


class SnapshotRejected(Exception):
    """The parity gate failed: the snapshot was not published. `report` says why."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def snapshot_meta(result, samples_learned: int, extra: dict | None = None) -> dict:
    """meta.json content for an `ExportResult` (the store adds version, created, parent,
    sizes and sha256 when it publishes)."""
    p = result.parity
    return {
        "labels": list(result.labels),
        "input": result.input_spec,
        "normalization": result.normalization,
        "samples_learned": int(samples_learned),
        "heldout": {"n": p.n_heldout, "accuracy_fp32": p.accuracy_fp32,
                    "accuracy_int8": p.accuracy_int8, "per_class_fp32": p.per_class_fp32,
                    "per_class_int8": p.per_class_int8},
        "parity": p.as_dict(),
        "int8": {"published": p.passed, "failures": list(p.int8_failures)},
        "memory": result.memory,
        "export_seconds": {k: round(v, 4) for k, v in result.seconds.items()},
        **(extra or {}),
    }


class SnapshotStore:
    """Publish, list, verify, prune and roll back snapshot versions under `root`."""

    def __init__(self, root: str | os.PathLike, keep: int = 5):
        if keep < 1:
            raise UserError(f"snapshots keep={keep}: must keep at least 1 version")
        self.root = Path(root)
        self.keep = int(keep)
        self._lock = threading.RLock()
        self._depth = 0
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create snapshot directory {self.root}: {exc}") from exc
        with self._locked():
            self._sweep()

    # -- reading ----------------------------------------------------------------------------

    def versions(self) -> list[int]:
        """Published versions, oldest first."""
        return sorted(int(p.name) for p in self.root.iterdir()
                      if p.name.isdigit() and p.is_dir())

    def latest(self, name: str | None = None) -> int | None:
        """The newest version, or the newest that has file `name` (say, the int8 model)."""
        versions = [v for v in self.versions() if name is None or self.path(v, name).is_file()]
        return versions[-1] if versions else None

    def path(self, version: int, name: str = "") -> Path:
        return self.root / str(int(version)) / name if name else self.root / str(int(version))

    def meta(self, version: int | None = None) -> dict:
        """meta.json of `version` (default: the newest)."""
        version = self.latest() if version is None else version
        if version is None:
            raise UserError(f"no snapshot has been published in {self.root} yet")
        path = self.path(version, META_FILE)
        if not path.is_file():
            raise UserError(f"snapshot version {version} does not exist in {self.root} "
                            f"(published: {self._describe_versions()})")
        return json.loads(path.read_text())

    def verify(self, version: int) -> dict:
        """Check every file against the sha256 in meta.json; returns the meta."""
        meta = self.meta(version)
        for name, info in meta["files"].items():
            path = self.path(version, name)
            if not path.is_file():
                raise SnapshotCorrupt(f"snapshot {version}: {name} is missing")
            digest = sha256_file(path)
            if digest != info["sha256"]:
                raise SnapshotCorrupt(f"snapshot {version}: {name} has sha256 {digest[:12]}…, "
                                      f"meta.json records {info['sha256'][:12]}…")
        return meta

    def read(self, version: int, name: str, offset: int = 0, size: int | None = None) -> bytes:
        """Bytes of one published file (for chunked transfer)."""
        if name not in (*MODEL_FILES, META_FILE):
            raise UserError(f"unknown snapshot file {name!r}; files are "
                            f"{', '.join((*MODEL_FILES, META_FILE))}")
        if offset < 0 or (size is not None and size < 0):
            raise ValueError(f"offset {offset} and size {size} must not be negative")
        path = self.path(version, name)
        try:
            with open(path, "rb") as fh:
                total = os.fstat(fh.fileno()).st_size
                if offset >= total:  # past the end: nothing to read, and no seek to refuse
                    return b""
                fh.seek(offset)
                return fh.read() if size is None else fh.read(min(size, total - offset))
        except FileNotFoundError:
            raise UserError(f"snapshot version {version} has no {name} (published: "
                            f"{self._describe_versions()})") from None

    def last_failure(self) -> dict | None:
        path = self.root / FAILURE_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def status(self) -> dict:
        """What `edgecl status` shows about snapshots."""
        latest = self.latest()
        return {"latest": latest, "versions": self.versions(),
                "highest_assigned": self._read_counter(),
                "latest_meta": None if latest is None else _summary(self.meta(latest)),
                "last_failure": self.last_failure()}

    # -- writing ----------------------------------------------------------------------------

    def publish_export(self, result, samples_learned: int, extra: dict | None = None,
                       fp32_alone: bool = False) -> int:
        """Publish an `ExportResult` if its parity gate passed; record and raise if not.
        With `fp32_alone`, a result that failed only int8's checks is published without its
        int8 model (the failure is recorded all the same)."""
        if not result.passed:
            report = result.parity.as_dict()
            alone = fp32_alone and result.fp32_passed
            self.record_failure(report, samples_learned, fp32_published=alone)
            if not alone:
                raise SnapshotRejected("parity gate failed: " +
                                       "; ".join(result.parity.failures), report)
        meta = snapshot_meta(result, samples_learned, extra)
        files = {FP32_FILE: result.fp32}
        if result.passed:
            files[INT8_FILE] = result.int8
        return self.publish(files, meta)

    def publish(self, files: dict[str, bytes], meta: dict) -> int:
        """Write a new version atomically; returns its number. `meta` is completed with
        version, created, parent, edgecl version, sizes and sha256 of every file."""
        unknown = set(files) - set(MODEL_FILES)
        if unknown:
            raise ValueError(f"unknown snapshot files: {sorted(unknown)}")
        with self._locked():
            parent = self.latest()
            version = max(self._read_counter(), parent or 0) + 1
            now = time.time()
            meta = {**meta, "version": version, "parent": parent, "created_unix": now,
                    "created": datetime.fromtimestamp(now, timezone.utc).isoformat(),
                    "edgecl_version": __version__}
            memory = meta.pop("memory", {})
            meta["files"] = {name: {"bytes": len(data), "sha256": sha256_bytes(data),
                                    **({"memory": memory[name]} if name in memory else {})}
                             for name, data in files.items()}
            tmp = self.root / f"{TMP_PREFIX}{version}"
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            for name, data in files.items():
                write_synced(tmp / name, data)
            write_synced(tmp / META_FILE, json.dumps(meta, indent=2, sort_keys=True).encode())
            fsync_dir(tmp)
            # The counter first: a crash between the two lines skips a number, never reuses one.
            write_atomic(self.root / COUNTER_FILE, f"{version}\n".encode())
            os.rename(tmp, self.path(version))
            fsync_dir(self.root)
            self._prune()
        log.info("published snapshot %d (%s)", version, ", ".join(
            f"{n} {len(d) / 1024:.0f} KiB" for n, d in files.items()))
        return version

    def rollback(self, to: int | None = None) -> int:
        """Republish version `to` (default: the one before the newest) as a new version."""
        with self._locked():
            versions = self.versions()
            if to is None:
                if len(versions) < 2:
                    raise UserError("rollback needs an older version to go back to; published: "
                                    f"{self._describe_versions()}")
                to = versions[-2]
            if to not in versions:
                raise UserError(f"cannot roll back to version {to}: published versions are "
                                f"{self._describe_versions()}")
            meta = self.verify(to)
            files = {name: self.path(to, name).read_bytes() for name in meta["files"]}
            keep = {k: v for k, v in meta.items()
                    if k not in ("version", "parent", "created", "created_unix", "files",
                                 "edgecl_version")}
            keep["memory"] = {n: f["memory"] for n, f in meta["files"].items() if "memory" in f}
            keep.update(rollback_of=versions[-1], source_version=to)
            return self.publish(files, keep)

    def record_failure(self, report: dict, samples_learned: int | None = None,
                       fp32_published: bool = False) -> None:
        """Keep the last rejected export's report for status (`fp32_published`: only its
        int8 model was held back)."""
        now = time.time()
        entry = {"time_unix": now, "time": datetime.fromtimestamp(now, timezone.utc).isoformat(),
                 "samples_learned": samples_learned, "failures": report.get("failures", []),
                 "fp32_published": fp32_published, "report": report}
        with self._locked():
            write_atomic(self.root / FAILURE_FILE, json.dumps(entry, indent=2).encode())
        log.warning("%s: %s", "int8 model not published (fp32 published alone)"
                    if fp32_published else "snapshot not published", "; ".join(entry["failures"]))

    # -- internals --------------------------------------------------------------------------

    @contextmanager
    def _locked(self):
        """One writer at a time: a thread lock, plus a file lock against other processes."""
        with self._lock:
            if self._depth:  # re-entered (rollback -> publish): this thread holds both
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            with open(self.root / ".lock", "a") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                self._depth = 1
                try:
                    yield
                finally:
                    self._depth = 0
                    fcntl.flock(fh, fcntl.LOCK_UN)

    def _read_counter(self) -> int:
        try:
            return int((self.root / COUNTER_FILE).read_text().strip() or 0)
        except FileNotFoundError:
            return 0
        except ValueError as exc:
            raise UserError(f"{self.root / COUNTER_FILE} is not a version number: {exc}") from exc

    def _prune(self) -> None:
        """Keep the last `keep` versions, and the newest one with an int8 model: what a
        device that runs int8 installs while newer versions are fp32 alone."""
        int8 = self.latest(INT8_FILE)
        for version in self.versions()[:-self.keep]:
            if version == int8:
                continue
            trash = self.root / f"{TRASH_PREFIX}{version}"
            os.rename(self.path(version), trash)
            shutil.rmtree(trash, ignore_errors=True)
            log.info("pruned snapshot %d (keeping the last %d)", version, self.keep)

    def _sweep(self) -> None:
        """Remove what an interrupted publish or prune left behind."""
        for p in self.root.iterdir():
            if p.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()

    def _describe_versions(self) -> str:
        versions = self.versions()
        return ", ".join(map(str, versions)) if versions else "none"


def _summary(meta: dict) -> dict:
    """The few fields status shows for a version."""
    held = meta.get("heldout", {})
    return {"version": meta["version"], "created": meta.get("created"),
            "samples_learned": meta.get("samples_learned"),
            "accuracy_fp32": held.get("accuracy_fp32"), "accuracy_int8": held.get("accuracy_int8"),
            "bytes": {n: f["bytes"] for n, f in meta.get("files", {}).items()}}
