"""Snapshots on the daemon: hold out a slice, export on a trigger, publish, serve devices.

Built by the daemon in its learner thread (`start_snapshots`, when `[snapshots]` is enabled),
it uses only the daemon's extension points:

- The daemon wraps its learner in a HeldOutRouter, so each batch first passes the
  HeldOutSlice: held-out samples are never learned. Both run in the learner thread, the
  slice's only owner.
- A learner hook (learner thread) decides when a snapshot is due: every `every_samples`
  learned samples and/or every `every_s` seconds, or on request; never when nothing was
  learned since the last one, unless a merged global model changed the weights (trigger
  `merge`). It copies the weights, labels, replay buffer and held-out slice (learning
  pauses only for the copy) and hands them to the export thread.
- The export thread runs export + int8 + parity gate and publishes to the SnapshotStore, then
  announces the version on the PUB socket (topic `snapshot`). A rejected snapshot is logged
  and shown in status (`snapshot_last_failure`).
- Ops, in the socket loop (no torch there, only file reads):
  `snapshot.info` (newest version and its meta; long-polls with `since` + `wait_ms`),
  `snapshot.chunk` (a byte range of one file, credit-based), `snapshot.export` (export now;
  with `wait_ms`, long-polls for what came of it), `snapshot.rollback` (republish an older
  version as the newest).
- Every `snapshot.export` with `wait_ms` gets a ticket. The next export copied after it (or
  the finding that nothing new was learned) settles every ticket issued so far, and the held
  request is answered with the outcome: published, nothing_new, rejected (with the gate's
  figures) or failed; a request whose wait ends first is answered timed_out.
- A rejection is announced on PUB (topic `snapshot.rejected`), and the next try comes after a
  quarter of the usual period rather than a whole one.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np

from edgecl.export.freshness import Freshness
from edgecl.export.heldout import HeldOutSlice
from edgecl.export.onnx import ParityThresholds, copy_model, export_student
from edgecl.export.snapshots import SnapshotRejected, SnapshotStore
from edgecl.config import SnapshotConfig
from edgecl.errors import UserError
from edgecl.files import FP32_FILE, INT8_FILE, META_FILE, MODEL_FILES, sha256_bytes
from edgecl.threads import lower_this_thread
from edgecl.wire import ErrorCode, WireError

log = logging.getLogger("edgecl.snapshots")

TOPIC = "snapshot"
REJECTED_TOPIC = "snapshot.rejected"
FILES = (*MODEL_FILES, META_FILE)
PRECISIONS = {"any": None, "fp32": FP32_FILE, "int8": INT8_FILE}  # snapshot.info: file it needs
RETRY_FRACTION = 0.25   # after a rejection, the next try comes after this part of the period
EXPORT_NICENESS = 5     # exports, like learning, yield cores to the socket loop
KEPT_OUTCOMES = 32      # settled export outcomes remembered for held requests
_TICKET = object()      # key under which a held snapshot.export keeps its ticket (no client
                        # can send a non-string key, so none can forge one)


def thresholds(settings: SnapshotConfig) -> ParityThresholds:
    return ParityThresholds(settings.gate_max_abs_logit, settings.gate_min_int8_agreement,
                            settings.gate_max_accuracy_drop, settings.gate_alpha)


@dataclass
class _Job:
    model: object
    labels: list
    input_shape: tuple
    input_dtype: str
    calibration: np.ndarray
    heldout_x: np.ndarray | None
    heldout_y: list
    samples_learned: int
    reason: str
    ticket: int = 0     # export requests issued up to the copy: this job settles them
    covered: list = None  # Freshness records of the pushes learned since the last copy


class HeldOutRouter:
    """The learner, seen through the held-out slice: `learn_many` learns only the samples the
    slice does not keep back. Everything else is the wrapped learner's."""

    def __init__(self, learner, heldout: HeldOutSlice):
        self._learner = learner
        self.heldout = heldout

    def learn_many(self, x, y):
        x = np.asarray(x)
        kept = self.heldout.offer(x, list(y))
        if kept.all():
            return {"n": 0, "correct": 0, "loss": float("nan"), "held_out": int(kept.sum())}
        if not kept.any():
            return self._learner.learn_many(x, y)
        out = self._learner.learn_many(x[~kept], [v for v, k in zip(y, kept) if not k])
        return {**out, "held_out": int(kept.sum())} if isinstance(out, dict) else out

    def __getattr__(self, name):
        return getattr(self._learner, name)


class SnapshotService:
    """Owns the store, the held-out slice and the export thread of one daemon."""

    def __init__(self, daemon, settings: SnapshotConfig):
        self.daemon = daemon
        self.settings = settings
        self.store = SnapshotStore(daemon.state_dir / "snapshots", keep=settings.keep)
        self.heldout = HeldOutSlice(settings.heldout_every, settings.heldout_per_class)
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=1)
        self._requested = threading.Event()
        self._changed = threading.Event()  # the model changed without learning (a merge)
        self._idle = threading.Event()
        self._idle.set()
        # What the learner had learned when we started (a restored checkpoint's count, or 0):
        # "nothing new learned" is judged against this, not against the newest snapshot,
        # which an earlier run may have made from a learner we no longer have.
        self._last_samples = int(daemon.learner.samples_learned)
        self._last_time = time.monotonic()  # when the last export ended (export thread)
        self._last_export_s = 0.0             # how long it took
        self._lock = threading.Lock()
        self._last_failure = self.store.last_failure()
        self._rejections = 0      # snapshots the parity gate refused this run
        self._int8_withheld_count = 0  # snapshots published as fp32 alone this run
        self._period_scale = 1.0  # RETRY_FRACTION after a rejection, 1 after a publish
        self._tickets = 0         # snapshot.export requests with wait_ms, issued (socket loop)
        self._outcomes: list[tuple[int, dict]] = []  # (tickets settled up to, outcome)
        self.freshness = Freshness()
        self._thread = threading.Thread(target=self._export_loop, name="edgecl-export",
                                        daemon=True)
        self._thread.start()
        self._update_status()

    # -- learner thread ---------------------------------------------------------------------

    def on_step(self, learner, samples_learned: int, final: bool) -> None:
        """Learner hook: copy and queue an export when one is due; at shutdown, end the export
        thread."""
        if final:
            self.finish()
            return
        self.freshness.learned(getattr(self.daemon, "current_batches", None))
        if not self._idle.is_set():
            return  # one export at a time; the next step will try again
        learned = int(getattr(learner, "samples_learned", samples_learned))
        reason = self._due(learned)
        if reason is None or getattr(learner, "student", None) is None or \
                len(learner.buffer) == 0:
            if learned <= self._last_samples:
                self._settle_nothing_new(learned)
            return
        job = self._copy(learner, learned, reason)
        self._changed.clear()
        job.covered = self.freshness.take()
        with self._lock:
            job.ticket = self._tickets
            self._requested.clear()
        self._last_samples = learned
        self._idle.clear()
        self._jobs.put(job)

    def model_changed(self) -> None:
        """Learner thread: the weights changed without new samples (a merged global model),
        so the next step or idle turn exports although nothing new was learned."""
        self._changed.set()

    def _due(self, learned: int) -> str | None:
        if self._changed.is_set():
            return "merge"
        if learned <= self._last_samples:
            return None  # nothing learned since the last snapshot
        s, scale = self.settings, self._period_scale
        if self._requested.is_set():
            return "requested"
        if s.every_samples and learned - self._last_samples >= s.every_samples * scale:
            return f"every {s.every_samples * scale:g} samples"
        # Timed exports count from the end of the last one and wait at least as long as it
        # took, so exporting never takes more than half the time, whatever the load.
        gap = max(s.every_s * scale, self._last_export_s)
        if s.every_s and time.monotonic() - self._last_time >= gap:
            return f"every {s.every_s * scale:g} s"
        return None

    def _settle_nothing_new(self, learned: int) -> None:
        """An export was asked for, but nothing was learned since the last one."""
        if not self._requested.is_set():
            return
        with self._lock:
            upto = self._tickets
            self._requested.clear()
        self._settle(upto, {"outcome": "nothing_new", "samples_learned": learned,
                            "samples_at_last_export": self._last_samples,
                            "latest": self.store.latest()})

    def _settle(self, upto: int, outcome: dict) -> None:
        with self._lock:
            if self._outcomes and self._outcomes[-1][0] >= upto:
                return  # no ticket was waiting for this one
            self._outcomes = [*self._outcomes[-(KEPT_OUTCOMES - 1):], (upto, outcome)]

    def _copy(self, learner, learned: int, reason: str) -> _Job:
        n = len(learner.buffer)
        hx, hy = self.heldout.arrays()
        return _Job(model=copy_model(learner.eval_model()), labels=list(learner.labels),
                    input_shape=tuple(learner.input_shape),
                    input_dtype=str(getattr(learner, "input_dtype", None) or
                                    learner.buffer.x.dtype),
                    calibration=learner.buffer.x[:n].copy(),
                    heldout_x=None if hx is None else hx.copy(), heldout_y=list(hy),
                    samples_learned=learned, reason=reason)

    # -- export thread ----------------------------------------------------------------------

    def _export_loop(self) -> None:
        lower_this_thread(EXPORT_NICENESS)
        while True:
            job = self._jobs.get()
            if job is None:
                return
            started = time.monotonic()
            try:
                self._run(job)
            finally:
                self._last_time = time.monotonic()
                self._last_export_s = self._last_time - started
                self._idle.set()

    def _run(self, job: _Job) -> None:
        started = time.perf_counter()
        try:
            result = export_student(job.model, job.labels, job.input_shape, job.calibration,
                                    job.heldout_x, job.heldout_y, input_dtype=job.input_dtype,
                                    thresholds=thresholds(self.settings))
            version = self.store.publish_export(result, job.samples_learned,
                                                extra={"trigger": job.reason},
                                                fp32_alone=self.settings.publish_fp32_alone)
        except SnapshotRejected as exc:
            self._rejected(job, exc)
            return
        except Exception as exc:
            log.exception("snapshot export failed at %d samples", job.samples_learned)
            self.freshness.rejected(job.covered or [])
            self._settle(job.ticket, {"outcome": "failed", "samples_learned": job.samples_learned,
                                      "message": f"{type(exc).__name__}: {exc}"})
            return
        self.freshness.published(job.covered or [])
        if not result.passed:
            self._int8_withheld()
        self._update_status()  # status follows the store as closely as it can
        self._period_scale = 1.0 if result.passed else RETRY_FRACTION
        log.info("snapshot %d published (%s, %d samples, %.1f s%s)", version, job.reason,
                 job.samples_learned, time.perf_counter() - started,
                 "" if result.passed else "; fp32 alone, int8 failed the gate")
        self.announce(version)
        meta = self.store.meta(version)
        self._settle(job.ticket, {"outcome": "published", "version": version,
                                  "samples_learned": job.samples_learned,
                                  "parity": meta.get("parity"), "int8": meta.get("int8"),
                                  "bytes": {n: f["bytes"] for n, f in meta["files"].items()}})

    def _int8_withheld(self) -> None:
        """The fp32 model went out alone: count it; the int8 model is tried again early."""
        with self._lock:
            self._last_failure = self.store.last_failure()
            self._int8_withheld_count += 1

    def _rejected(self, job: _Job, exc: SnapshotRejected) -> None:
        """Status, the log, a PUB line for devices, and an earlier retry."""
        self._period_scale = RETRY_FRACTION
        self.freshness.rejected(job.covered or [])
        with self._lock:
            self._last_failure = self.store.last_failure()
            self._rejections += 1
        self._update_status()
        log.warning("snapshot at %d samples rejected: %s", job.samples_learned, exc)
        latest = self.store.latest()
        self.daemon.announce(REJECTED_TOPIC, {"version": latest, "rejected": True,
                                              "samples_learned": job.samples_learned,
                                              "failures": list(exc.report.get("failures", []))})
        self._settle(job.ticket, {"outcome": "rejected", "samples_learned": job.samples_learned,
                                  "latest": latest, "parity": exc.report})

    def announce(self, version: int) -> None:
        meta = self.store.meta(version)
        self.daemon.announce(TOPIC, {"version": version,
                                     "samples_learned": meta.get("samples_learned"),
                                     "files": {n: f["sha256"] for n, f in meta["files"].items()},
                                     "int8_version": self.store.latest(INT8_FILE)})
        self._update_status()

    def restore_heldout(self, state: dict) -> None:
        """The held-out slice from a checkpoint (daemon restart): it stays never-learned."""
        self.heldout.load_state_dict(state)
        self._update_status()

    def close(self) -> None:
        self._jobs.put(None)

    def finish(self, timeout_s: float = 120.0) -> None:
        """Let a running export end, then stop its thread. Exiting while it runs aborts the
        process ("terminate called without an active exception": the interpreter goes away
        under torch/onnxruntime native code), so a SIGTERM would end in a non-zero exit."""
        try:
            self._jobs.put(None, timeout=timeout_s)
        except queue.Full:
            pass
        self._thread.join(timeout_s)

    # -- socket-loop ops --------------------------------------------------------------------

    def op_info(self, header: dict, payload) -> dict | None:
        """Newest version and its meta (with `precision` "int8": the newest that has an int8
        model). With `since` and `wait_ms`, returns None (the daemon retries it) while
        nothing newer than `since` exists and the wait is not over."""
        since = header.get("since")
        if since is not None and (type(since) is not int or since < 0):
            raise WireError(ErrorCode.BAD_REQUEST, "since: expected a version number >= 0")
        wait_ms = header.get("wait_ms", 0)
        if type(wait_ms) is not int or wait_ms < 0:
            raise WireError(ErrorCode.BAD_REQUEST, "wait_ms: expected milliseconds >= 0")
        precision = header.get("precision", "any")
        if type(precision) is not str or precision not in PRECISIONS:
            raise WireError(ErrorCode.BAD_REQUEST, "precision: expected one of "
                                                   f"{', '.join(PRECISIONS)}")
        latest = self.store.latest(PRECISIONS[precision])
        if since is not None and wait_ms > 0 and (latest is None or latest <= since):
            return None
        int8 = latest if precision == "int8" else self.store.latest(INT8_FILE)
        reply = {"version": latest, "meta": None, "chunk_bytes": self.settings.chunk_bytes,
                 "credit": self.settings.credit, "int8_version": int8}
        if latest is None:
            return reply
        meta_bytes = self.store.read(latest, META_FILE)
        return {**reply, "meta": json.loads(meta_bytes), "meta_sha256": sha256_bytes(meta_bytes),
                "meta_bytes": len(meta_bytes)}

    def op_chunk(self, header: dict, payload) -> dict:
        """Bytes [offset, offset + size) of one file of one version, in the reply."""
        version, name = header.get("version"), header.get("file")
        offset, size = header.get("offset", 0), header.get("size", self.settings.chunk_bytes)
        if type(version) is not int:
            raise WireError(ErrorCode.BAD_REQUEST, "version: expected an integer")
        if name not in FILES:
            raise WireError(ErrorCode.BAD_REQUEST, f"file: expected one of {', '.join(FILES)}")
        if type(offset) is not int or offset < 0 or type(size) is not int or size <= 0:
            raise WireError(ErrorCode.BAD_REQUEST, "offset and size: expected integers, "
                                                   "offset >= 0 and size > 0")
        size = min(size, self.settings.chunk_bytes)
        try:
            data = self.store.read(version, name, offset, size)
            total = self.store.path(version, name).stat().st_size
        except (UserError, FileNotFoundError):
            raise WireError(ErrorCode.NOT_FOUND, f"snapshot version {version} is not available (newest: "
                            f"{self.store.latest()}); ask snapshot.info again") from None
        return {"version": version, "file": name, "offset": offset, "size": len(data),
                "total": total, "eof": offset + len(data) >= total, "data": data,
                "credit": self.settings.credit}

    def op_export(self, header: dict, payload) -> dict | None:
        """Ask for a snapshot at the next learner step (if anything new was learned). With
        `wait_ms`, held until that export is settled (or the wait ends: `timed_out`)."""
        wait_ms = header.get("wait_ms", 0)
        if type(wait_ms) is not int or wait_ms < 0:
            raise WireError(ErrorCode.BAD_REQUEST, "wait_ms: expected milliseconds >= 0")
        fresh = _TICKET not in header  # held requests are asked again with their ticket
        if fresh:
            with self._lock:
                self._tickets += 1
                header[_TICKET] = self._tickets
                self._requested.set()
        ticket = header[_TICKET]
        reply = {"requested": True, "latest": self.store.latest(),
                 "samples_at_latest": self._last_samples}
        if fresh and wait_ms == 0:
            return reply  # fire and forget
        outcome = self._outcome(ticket)
        if outcome is not None:
            return {**reply, **outcome}
        if wait_ms > 0:
            return None
        return {**reply, "outcome": "timed_out"}

    def _outcome(self, ticket: int) -> dict | None:
        with self._lock:
            return next((o for upto, o in self._outcomes if upto >= ticket), None)

    def op_rollback(self, header: dict, payload) -> dict:
        to = header.get("to")
        if to is not None and type(to) is not int:
            raise WireError(ErrorCode.BAD_REQUEST, "to: expected a version number")
        try:
            version = self.store.rollback(to)
        except UserError as exc:
            raise WireError(ErrorCode.BAD_REQUEST, str(exc)) from None
        self.announce(version)
        return {"version": version, "source_version": self.store.meta(version)["source_version"]}

    # -- status -----------------------------------------------------------------------------

    def _update_status(self) -> None:
        latest = self.store.latest()
        with self._lock:
            failure, rejections = self._last_failure, self._rejections
            withheld = self._int8_withheld_count
        self.daemon.update_status(
            snapshot_version=latest, snapshot_versions=self.store.versions(),
            snapshot_int8_version=self.store.latest(INT8_FILE),
            snapshots_rejected=rejections, snapshots_int8_withheld=withheld,
            snapshot_last_failure=None if failure is None else
            {"time": failure.get("time"), "samples_learned": failure.get("samples_learned"),
             "failures": failure.get("failures"),
             "fp32_published": bool(failure.get("fp32_published"))},
            heldout_samples=len(self.heldout), snapshot_age=self.freshness.summary())


def start_snapshots(daemon) -> SnapshotService:
    """Snapshots for `daemon`, per its `[snapshots]` settings: the service, its ops, hooks and
    checkpointed held-out slice registered. The daemon keeps the service and routes its
    learner through `service.heldout` (HeldOutRouter)."""
    service = SnapshotService(daemon, daemon.config.snapshots)
    daemon.add_state_part("heldout", service.heldout.state_dict, service.restore_heldout)
    daemon.add_learner_hook(service.on_step)
    daemon.add_idle_hook(lambda learner, samples: service.on_step(learner, samples, False))
    daemon.register_op("snapshot.info", service.op_info, long_poll=True)
    daemon.register_op("snapshot.chunk", service.op_chunk)
    daemon.register_op("snapshot.export", service.op_export, long_poll=True)
    daemon.register_op("snapshot.rollback", service.op_rollback)
    return service
