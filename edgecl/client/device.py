"""`DeviceClient`, the device side of snapshots: pull the newest version into a directory,
safely.

    DIR/model.onnx, DIR/model.int8.onnx, DIR/meta.json      (the installed version)
    DIR/.partial/<version>/<file>                             (a download in progress)

- `snapshot.info` says which version is newest, with its meta.json (sha256 of every file).
- Each file comes in `snapshot.chunk` byte ranges, up to `credit` requests in flight at a
  time (zguide's credit-based file transfer); a lost reply is re-requested.
- A download resumes from what `.partial` already holds; if the finished file's sha256 does
  not match, it is deleted and fetched once more from byte 0, then the pull fails.
- Only after every file checks out are they renamed into DIR, meta.json last: until then the
  previous model stays in place, untouched.
- A version may hold the fp32 model alone (its int8 model failed the parity gate). A device
  that takes both installs it and removes its old int8 file; an `int8_only` device asks for
  the newest version that has an int8 model (`precision` "int8") and keeps its own until then.

`pull_and_score` is the device's end of `edgecl demo` and `edgecl bench realtime`: ask for a
snapshot, pull it, score both models with onnxruntime.

Nothing here imports torch: a device needs pyzmq, msgpack and (to infer) onnxruntime.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Callable

import msgpack
import numpy as np
import zmq

from edgecl.client.connection import (DEFAULT_RETRIES, DEFAULT_TIMEOUT_S, Connection,
                                      DaemonUnavailable, LazyPirate, RequestRefused, new_socket)
from edgecl.errors import UserError
from edgecl.security import ClientCurve
from edgecl.files import (FP32_FILE, INT8_FILE, META_FILE, MODEL_FILES, SnapshotCorrupt,
                          fsync_dir, fsync_file, sha256_bytes, sha256_file)
from edgecl.wire import PROTOCOL_VERSION, ErrorCode, pack, unpack_reply

log = logging.getLogger("edgecl.pull")

PARTIAL_DIR = ".partial"
TOPIC = b"snapshot"
REJECTED_TOPIC = b"snapshot.rejected"


class DeviceClient:
    """Keeps `out_dir` at the daemon's newest snapshot. `pull()` once, `watch()` to follow."""

    def __init__(self, address: str, out_dir: str | os.PathLike, int8_only: bool = False,
                 timeout: float = DEFAULT_TIMEOUT_S, retries: int = DEFAULT_RETRIES,
                 context: zmq.Context | None = None, curve: ClientCurve | None = None):
        self.address = address
        self.curve = curve
        self.out_dir = Path(out_dir)
        self.int8_only = int8_only
        self.timeout = timeout
        self.retries = retries
        self._ctx = context or zmq.Context.instance()
        self._rids = itertools.count(1)
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot use output directory {self.out_dir}: {exc}") from None

    # -- what is installed ------------------------------------------------------------------

    def local_version(self) -> int | None:
        """Version in out_dir/meta.json, or None if nothing was installed yet."""
        try:
            return int(json.loads((self.out_dir / META_FILE).read_text())["version"])
        except (FileNotFoundError, KeyError, ValueError):
            return None

    def files_wanted(self, meta: dict | None = None) -> tuple[str, ...]:
        """The model files to install from a version with `meta`: the int8 model alone, or
        every model file the version has (a version may hold fp32 alone: meta `int8`)."""
        if self.int8_only:
            return (INT8_FILE,)
        return tuple(n for n in MODEL_FILES if meta is None or n in meta.get("files", {}))

    # -- requests ---------------------------------------------------------------------------

    def info(self, since: int | None = None, wait_ms: int = 0) -> dict:
        """The daemon's newest version and meta; long-polls up to wait_ms for one > since."""
        fields = {} if since is None else {"since": since, "wait_ms": int(wait_ms)}
        if self.int8_only:
            fields["precision"] = "int8"  # the newest version that has an int8 model
        with Connection(self.address, self.timeout + wait_ms / 1000, self.retries,
                        self._ctx, curve=self.curve) as conn:
            return conn.request("snapshot.info", **fields)

    def pull(self, wait_ms: int = 0) -> int | None:
        """Install the newest version if it is newer than ours. Returns the version installed,
        or None if we already have the newest (after waiting up to wait_ms for a newer one)."""
        local = self.local_version()
        info = self.info(since=local or 0, wait_ms=wait_ms) if wait_ms else self.info()
        version = info.get("version")
        if version is None or (local is not None and version <= local):
            return None
        try:
            self._install(info)
        except RequestRefused as exc:
            if exc.code != ErrorCode.NOT_FOUND:
                raise
            # Pruned while we downloaded (publishing outpaced us): start over with the newest.
            info = self.info()
            version = info["version"]
            self._install(info)
        return version

    def watch(self, on_update: Callable[[int], None] | None = None,
              stop: threading.Event | None = None, poll_ms: int = 30_000,
              on_reject: Callable[[dict], None] | None = None) -> None:
        """Follow new versions until `stop` is set: wake on each PUB announcement (port + 1),
        and long-poll `snapshot.info` as a fallback for announcements missed. A snapshot the
        parity gate rejected is passed to `on_reject` (its announcement's body)."""
        stop = stop or threading.Event()
        sub = new_socket(self._ctx, _pub_address(self.address), self.curve, zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, TOPIC)
        try:
            while not stop.is_set():
                try:
                    installed = self.pull()
                except (DaemonUnavailable, SnapshotCorrupt, RequestRefused) as exc:
                    log.warning("pull failed, keeping version %s: %s", self.local_version(), exc)
                    installed = None
                if installed is not None:
                    log.info("installed snapshot %d in %s", installed, self.out_dir)
                    if on_update is not None:
                        on_update(installed)
                    continue
                deadline = time.monotonic() + poll_ms / 1000
                while not stop.is_set() and time.monotonic() < deadline:
                    if sub.poll(200):
                        frames = sub.recv_multipart()
                        if frames[0] == REJECTED_TOPIC and len(frames) > 1:
                            _notify_rejection(frames[1], on_reject)
                            continue  # nothing new to install
                        break
        finally:
            sub.close(linger=0)

    # -- download and install ---------------------------------------------------------------

    def _install(self, info: dict) -> None:
        version, meta = info["version"], info["meta"]
        partial = self.out_dir / PARTIAL_DIR / str(version)
        partial.mkdir(parents=True, exist_ok=True)
        for old in (self.out_dir / PARTIAL_DIR).iterdir():
            if old.name != str(version):  # downloads of versions no longer newest
                shutil.rmtree(old, ignore_errors=True)
        missing = [n for n in self.files_wanted(meta) if n not in meta["files"]]
        if missing:
            raise UserError(f"snapshot {version} has no {', '.join(missing)} (the daemon "
                            "published fp32 alone and does not know `precision`?); kept "
                            f"version {self.local_version()}")
        wanted = [(n, meta["files"][n]["bytes"], meta["files"][n]["sha256"])
                  for n in self.files_wanted(meta)]
        wanted.append((META_FILE, info["meta_bytes"], info["meta_sha256"]))
        for name, size, digest in wanted:
            self._fetch_verified(version, name, size, digest, partial / name,
                                 info.get("chunk_bytes", 256 * 1024), info.get("credit", 4))
        for name, _, _ in wanted:  # meta.json last: it names the installed version
            os.replace(partial / name, self.out_dir / name)
        for name in set(MODEL_FILES) - {n for n, _, _ in wanted}:
            (self.out_dir / name).unlink(missing_ok=True)  # not this version's: never stale
        fsync_dir(self.out_dir)
        shutil.rmtree(partial, ignore_errors=True)

    def _fetch_verified(self, version: int, name: str, size: int, digest: str, dest: Path,
                        chunk: int, credit: int) -> None:
        for attempt in range(2):
            self._fetch(version, name, size, dest, chunk, credit)
            got = sha256_file(dest)
            if got == digest:
                fsync_file(dest)
                return
            dest.unlink()
            log.warning("snapshot %d %s: sha256 %s… does not match meta.json's %s…%s", version,
                        name, got[:12], digest[:12], "; fetching again" if not attempt else "")
        raise SnapshotCorrupt(f"snapshot {version}: {name} does not match its sha256 after two "
                              f"downloads; kept version {self.local_version()} in place")

    def _fetch(self, version: int, name: str, size: int, dest: Path, chunk: int,
               credit: int) -> None:
        """Append [len(dest), size) to dest, `credit` chunk requests in flight at a time."""
        have = dest.stat().st_size if dest.exists() else 0
        if have > size:
            dest.unlink()
            have = 0
        next_offset, arrived = have, {}
        in_flight: dict[int, int] = {}  # rid -> offset
        link = LazyPirate(self._ctx, self.address, self.curve, self.timeout, self.retries)
        tries = 0
        try:
            with open(dest, "ab") as out:
                while have < size:
                    while len(in_flight) < max(1, credit) and next_offset < size:
                        rid = next(self._rids)
                        link.sock.send(pack({"v": PROTOCOL_VERSION, "op": "snapshot.chunk",
                                             "rid": rid, "version": version, "file": name,
                                             "offset": next_offset, "size": chunk}))
                        in_flight[rid] = next_offset
                        next_offset += chunk
                    if not link.sock.poll(int(self.timeout * 1000)):
                        tries += 1  # a fresh socket, and what was in flight asked again
                        link.timed_out(tries, f"no reply from {self.address} to snapshot.chunk")
                        next_offset = min(in_flight.values(), default=next_offset)
                        in_flight.clear()
                        continue
                    reply = unpack_reply(link.sock.recv())
                    offset = in_flight.pop(reply.get("rid"), None)
                    if offset is None:
                        continue  # an answer to a request we gave up on
                    if not reply["ok"]:
                        raise RequestRefused(reply.get("error", "?"), reply.get("message", ""))
                    tries = 0
                    credit = int(reply.get("credit", credit))
                    arrived[offset] = reply["data"]
                    while have in arrived:
                        data = arrived.pop(have)
                        if not data:
                            raise SnapshotCorrupt(f"snapshot {version}: {name} ended at byte "
                                                  f"{have}, meta.json says {size}")
                        out.write(data)
                        have += len(data)
                out.flush()
        finally:
            link.close()


def _notify_rejection(body: bytes, on_reject: Callable[[dict], None] | None) -> None:
    try:
        note = msgpack.unpackb(body, raw=False)
    except (ValueError, msgpack.UnpackException):
        note = None
    note = note if isinstance(note, dict) else {}
    log.info("snapshot at %s samples rejected by the parity gate: %s",
             note.get("samples_learned"), "; ".join(note.get("failures") or []))
    if on_reject is not None:
        on_reject(note)


def _pub_address(address: str) -> str:
    """Announcements are on the request port + 1."""
    head, _, port = address.rpartition(":")
    if not port.isdigit():
        raise UserError(f"{address}: expected tcp://HOST:PORT")
    return f"{head}:{int(port) + 1}"


def pull_and_score(address: str, out_dir: str, test_x: np.ndarray, test_y: np.ndarray,
                   wait_s: float = 120.0, curve: ClientCurve | None = None) -> dict | None:
    """Ask for a fresh snapshot and wait until that export is settled, then pull the newest
    published one over the wire (sha256-checked) as a device does, and score the fp32 and
    int8 ONNX models with onnxruntime on the test samples (int8's score is None when the
    version holds fp32 alone). If the gate refused the fresh one, the device gets the one
    before (`outcome` says which). None when no snapshot was ever published."""
    with Connection(address, wait_s + 5, 0, curve=curve) as conn:
        outcome = conn.request("snapshot.export", wait_ms=int(wait_s * 1000)).get("outcome")
    device = DeviceClient(address, out_dir, curve=curve)
    device.pull()
    if device.local_version() is None:
        return None
    return {**score_installed(out_dir, test_x, test_y), "outcome": outcome}


def score_installed(out_dir: str | os.PathLike, test_x: np.ndarray, test_y: np.ndarray) -> dict:
    """Accuracy of each model installed in `out_dir` on the test samples, with onnxruntime;
    a model file the installed version does not hold scores None."""
    import onnxruntime as ort

    meta = json.loads((Path(out_dir) / META_FILE).read_text())
    scores: dict = {"version": meta["version"], "labels": meta["labels"]}
    for name in (FP32_FILE, INT8_FILE):
        path = Path(out_dir) / name
        if name not in meta["files"] or not path.is_file():
            scores[name] = None  # fp32 published alone, or an int8-only device
            continue
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        logits = session.run(None, {meta["input"]["name"]: test_x})[0]
        predicted = np.asarray(meta["labels"])[logits.argmax(1)]
        scores[name] = {"accuracy": float(np.mean(predicted == test_y)),
                        "bytes": path.stat().st_size}
    return scores


def verify_installed(out_dir: str | os.PathLike) -> dict:
    """Check DIR's model files against DIR/meta.json; returns the meta."""
    out = Path(out_dir)
    meta = json.loads((out / META_FILE).read_text())
    for name, info in meta["files"].items():
        path = out / name
        if path.exists() and sha256_file(path) != info["sha256"]:
            raise SnapshotCorrupt(f"{path} does not match the sha256 in {out / META_FILE}")
    return meta


__all__ = ["DeviceClient", "pull_and_score", "score_installed", "verify_installed",
           "sha256_bytes"]
