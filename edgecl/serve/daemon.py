"""`edgecl serve`: the daemon, put together from its two threads' halves and nothing else.

    sensor --push--> [socket loop: validate -> dedup -> commit (ack)] --queue--> [learner thread]
                      ROUTER :port, PUB :port+1                                   learn_many()

Two threads, two owners:
- The socket loop (edgecl/serve/ingest.py) owns both sockets, the dedup index and the input
  spec. It never runs torch and never calls the learner.
- The learner thread (edgecl/serve/learning.py) owns the learner and the checkpoints.
This module builds the parts (queue, journal, state keeper), starts and stops the threads,
and holds the extension points and `status`.

Extension points, for the snapshot and durability work:
- `_commit()` (ingest) is the single place a push becomes accepted: it appends the push to the
  journal, then queues it; the ack is sent after it returns (docs/durability.md).
- `add_state_part(name, get_state, set_state)` keeps a feature's state (the held-out slice) in
  every checkpoint and hands it back at the next start.
- `add_learner_hook(fn)` runs `fn(learner, samples_learned, final)` in the learner thread after
  each step and once at shutdown: the place to copy weights for export or write a checkpoint.
  `current_batches` holds the pushes that step is learning (their ack times, for freshness).
  `add_idle_hook(fn)` runs `fn(learner, samples_learned)` there when a wait for work times out.
- `register_op(name, handler)` adds a request op (snapshot info, chunk fetch) to the socket loop;
  with `long_poll=True` the handler may return None to hold the reply (see register_op).
- `announce(topic, payload)` publishes on the PUB socket from any thread.
- `update_status(**fields)` adds fields (e.g. snapshot_version) to `status` from any thread.
The features that use these (snapshots for devices, the time series) are built by
`_start_features`, in the learner thread, and kept as `snapshots` and `timeseries`.
"""
from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any, Callable

import zmq

from edgecl import __version__
from edgecl.config import Config, resolve_state_dir
from edgecl.errors import UserError
from edgecl.security import ROLES, server_curve
from edgecl.serve.checkpoints import StateKeeper
from edgecl.serve.counters import StreamCounts
from edgecl.serve.ingest import SPEC_FILE, Ingest  # noqa: F401  (SPEC_FILE: old imports)
from edgecl.serve.journal import Journal
from edgecl.serve.learning import FIRST_STEP_S, Learner, LearnerHook, LearnerThread  # noqa: F401
from edgecl.serve.queue import BusyLine, IngestQueue, SeenSequences
from edgecl.wire import PROTOCOL_VERSION, ErrorCode

log = logging.getLogger("edgecl.serve")

# How often a thread holding the GIL is asked to let another run (Python's default: 5 ms).
# The learner and export threads hold it in long stretches; a shorter interval lets the
# socket loop answer between them (BENCHMARKS.md, "realtime", on the ack tail).
SWITCH_INTERVAL_S = 0.001

OpHandler = Callable[[dict, Any], dict]


class Daemon(Ingest, LearnerThread):
    """One learner behind a ROUTER/PUB socket pair.

    Use `serve()` in the foreground (the CLI: installs SIGINT/SIGTERM handlers) or `start()` /
    `stop()` to run it in background threads (tests, demo, benchmarks).
    """

    def __init__(self, config: Config, learner: Learner | None = None):
        config.check()
        self.config = config
        self.curve = server_curve(config.serve)  # key files checked before anything starts
        self.state_dir = Path(resolve_state_dir(config.serve.state_dir))
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot use state directory {self.state_dir}: {exc.strerror}") \
                from None
        self.spec = self._resolve_spec(config.input.spec())
        # Built by the learner thread when not given (fast start: no torch before acks);
        # its settings' keys are checked now, the rest when it is built.
        self.learner = learner
        if learner is not None:
            self._check_learner()
        else:
            config.learner_config(validate=False)

        serve = config.serve
        self.queue = IngestQueue(serve.queue_bytes)
        self.busy_line = BusyLine(expire_s=max(1.0, 10 * serve.retry_after_ms / 1000))
        self.seen = SeenSequences(serve.dedup_window)
        self.port: int | None = None
        self.pub_port: int | None = None
        self.started_at = time.time()

        self.counts = StreamCounts()
        # Owned by the socket loop (other threads only read them, for status).
        # Every code present from the start: a stable schema, and no dict resizing while the
        # metrics thread copies it.
        self.refused: Counter[str] = Counter({code: 0 for code in ErrorCode.ALL})
        self.accepting = True
        self._last_push_by_sensor: dict[str, float] = {}
        self._active_sensors = 1
        self._active_counted_at = 0.0

        self._init_learner_side()
        self._extra_status: dict = {}
        self._classes: set = set()  # labels accepted so far (serve.max_classes)
        self.ready = threading.Event()  # the learner is loaded and every feature started
        self.load_error: str | None = None
        self._loop_calls: deque[Callable[[], None]] = deque()  # run by the socket loop
        self._ops: dict[str, OpHandler] = {"ping": self._op_ping, "status": self._op_status}
        self._long_poll_ops: set[str] = set()
        self._parked: list[tuple[float, list, dict, Any]] = []  # held long-poll requests
        self._announcements: deque[tuple[str, dict]] = deque()
        self._stop_requests = 0
        self._ctx: zmq.Context | None = None
        self._router: zmq.Socket | None = None
        self._pub: zmq.Socket | None = None
        self._metrics_server = None
        self._loop_thread: threading.Thread | None = None
        self._learner_thread: threading.Thread | None = None
        self.exit_code: int | None = None
        self._bound = threading.Event()
        self.journal, self.keeper = self._open_state(config)

    def _open_state(self, config: Config) -> tuple[Journal, StateKeeper]:
        """Durability (docs/durability.md): the journal gives offsets, counters and the dedup
        record before anything serves; the learner thread later adds the checkpoint."""
        settings = config.journal
        journal = Journal(self.state_dir / "journal", settings.fsync,
                          settings.fsync_interval_ms, settings.segment_bytes)
        keeper = StateKeeper(self, journal, config.checkpoints.every_steps,
                             config.checkpoints.every_s)
        keeper.restore_offsets()
        return journal, keeper

    def call_in_loop(self, fn: Callable[[], None]) -> None:
        """Run `fn` in the socket loop, which owns the dedup record and the push counters."""
        self._loop_calls.append(fn)

    def merge_restored(self, dedup: dict, duplicates: int, batches: int) -> None:
        """A checkpoint's dedup record and counters, loaded by the learner thread, joined
        with what the socket loop rebuilt from the journal (the newer entries win)."""
        def merge() -> None:
            merged = SeenSequences(self.seen.window, self.seen.max_sensors)
            merged.load_state_dict({"sensors": dedup["sensors"]
                                    + self.seen.state_dict()["sensors"]})
            self.seen = merged
            self.counts.samples_duplicate = max(self.counts.samples_duplicate, duplicates)
            self.counts.batches_received += batches
        self.call_in_loop(merge)

    # ----------------------------------------------------------------- extension points

    def register_op(self, name: str, handler: OpHandler, long_poll: bool = False) -> None:
        """Serve `op=name`. `handler(header, payload_frame_or_None)` runs in the socket loop,
        must not block or run torch, and returns the ok reply's fields or raises WireError.

        A `long_poll` handler may return None: "nothing to say yet". The request is then held
        and the handler called again each loop turn (every POLL_MS at most) until it answers
        or the request's `wait_ms` is over; then it is called with wait_ms=0 and must answer."""
        if name in self._ops or name == "push":
            raise ValueError(f"op {name!r} is already served")
        self._ops[name] = handler
        if long_poll:
            self._long_poll_ops.add(name)

    def add_learner_hook(self, hook: LearnerHook) -> None:
        """`hook(learner, samples_learned, final)` runs in the learner thread after every learn
        step (final=False) and once after the queue is drained at shutdown (final=True)."""
        self._learner_hooks.append(hook)

    def add_idle_hook(self, hook: Callable[[Any, int], None]) -> None:
        """`hook(learner, samples_learned)` runs in the learner thread whenever it waited
        `stats_interval_s` and found nothing to learn (time-based work while the stream is idle)."""
        self._idle_hooks.append(hook)

    def add_state_part(self, name: str, get_state: Callable[[], Any],
                       set_state: Callable[[Any], None]) -> None:
        """Keep `get_state()` in every checkpoint (called in the learner thread) and hand it
        to `set_state` at the next start, after every feature has started."""
        self.keeper.add_part(name, get_state, set_state)

    def announce(self, topic: str, payload: dict) -> None:
        """Publish `payload` under `topic` on the PUB socket; safe from any thread."""
        self._announcements.append((topic, dict(payload)))

    def update_status(self, **fields) -> None:
        """Add or replace top-level `status` fields; safe from any thread."""
        with self._stats_lock:
            self._extra_status = {**self._extra_status, **fields}

    # ----------------------------------------------------------------- lifecycle

    def start(self, wait_ready: bool = True) -> "Daemon":
        """Bind, then run the socket loop and learner in background threads. With
        `wait_ready`, return once the learner is loaded (UserError if it cannot be)."""
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.bind()
        self._learner_thread = threading.Thread(target=self._learn_loop, name="edgecl-learner",
                                                daemon=True)
        self._learner_thread.start()
        self._loop_thread = threading.Thread(target=self._socket_loop, name="edgecl-sockets",
                                             daemon=True)
        self._loop_thread.start()
        if wait_ready:
            while not self.ready.wait(0.05):
                if self.load_error is not None:
                    self.join(60)
                    raise UserError(self.load_error)
        return self

    def serve(self) -> int:
        """Run in the foreground until SIGINT/SIGTERM; returns the process exit code.

        First signal: stop accepting, learn what is queued, exit 0. Second signal: stop after
        the current step and exit 1, logging how many acked samples were not learned.
        """
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        try:
            if self._router is None:
                self.bind()
            self._learner_thread = threading.Thread(target=self._learn_loop,
                                                    name="edgecl-learner", daemon=True)
            self._learner_thread.start()
            self._socket_loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.exit_code if self.exit_code is not None else 0

    def _on_signal(self, signum, frame) -> None:
        log.info("received %s", signal.Signals(signum).name)
        self.stop()

    def stop(self) -> None:
        """Request shutdown; safe from any thread and from a signal handler. The first call
        drains the queue, a second one abandons it."""
        # No lock: this runs inside signal handlers, where taking one can deadlock.
        self._stop_requests += 1

    def join(self, timeout: float | None = None) -> int | None:
        """Wait for a `start()`ed daemon to finish; returns its exit code (None if still up)."""
        if self._loop_thread is not None:
            self._loop_thread.join(timeout)
            if self._loop_thread.is_alive():
                return None
        return self.exit_code

    def wait_bound(self, timeout: float = 10.0) -> bool:
        return self._bound.wait(timeout)

    @property
    def address(self) -> str:
        host = self.config.serve.bind
        host = "127.0.0.1" if host in ("0.0.0.0", "*") else host
        return f"tcp://{host}:{self.port}"

    # ----------------------------------------------------------------- counts and status

    # The stream's counts live in `counts` (edgecl/serve/counters.py); these read them.
    samples_received = property(lambda self: self.counts.samples_received)
    batches_received = property(lambda self: self.counts.batches_received)
    samples_duplicate = property(lambda self: self.counts.samples_duplicate)
    samples_learned = property(lambda self: self.counts.samples_learned)
    samples_offered = property(lambda self: self.counts.samples_offered)
    samples_failed = property(lambda self: self.counts.samples_failed)

    def status(self) -> dict:
        """The figures behind `edgecl status` and /metrics; cheap, callable from any thread.

        Keys are a stable schema (docs/protocol.md); labels keep their type, so per-class
        accuracy is a list of {label, acc} rather than a map keyed by label.
        """
        learned, offered, failed = self.counts.consumed_counts()
        counts = self.counts
        with self._stats_lock:
            stats = self._learner_stats
            learner_error = self.learner_error
            extra = self._extra_status
        classes = list(stats.get("classes", []))
        per_class = stats.get("per_class_acc", {})
        status = {
            "protocol": PROTOCOL_VERSION,
            "version": __version__,
            "uptime_s": round(time.time() - self.started_at, 3),
            "accepting": self.accepting,
            "input_spec": self.spec.as_dict() if self.spec else None,
            "samples_received": counts.samples_received,
            "samples_learned": learned,
            "samples_offered": offered,
            "samples_failed": failed,
            "samples_duplicate": counts.samples_duplicate,
            "batches_received": counts.batches_received,
            "queue_depth": counts.samples_received - learned - offered - failed,
            "overload": self.config.serve.overload,
            "learner_state": "learning" if self.ready.is_set() else "loading",
            "learn_rate": None if self.learn_rate is None else round(self.learn_rate, 2),
            "busy_line": len(self.busy_line),
            "queue_limit_samples": self.queue.limit_samples,
            "queue_bytes": self.queue.bytes,
            "queue_capacity_bytes": self.queue.capacity_bytes,
            "refused": dict(self.refused),
            "sensors": len(self.seen),
            "classes": classes,
            "n_classes": len(classes),
            "prequential_acc": stats.get("prequential_acc"),
            "prequential_acc_window": stats.get("prequential_acc_window"),
            "per_class_acc": [{"label": label, "acc": per_class[label]}
                              for label in classes if label in per_class],
            "buffer_fill": stats.get("buffer_fill"),
            "buffer_capacity": stats.get("buffer_capacity"),
            "buffer_bytes": stats.get("buffer_bytes"),
            "steps": stats.get("steps"),
            "steps_per_s": stats.get("steps_per_s"),
            "skipped_steps": stats.get("skipped_steps"),
            "snapshot_version": None,
            "learner_error": learner_error,
            "curve": self.curve is not None,
            "curve_refused": self.curve.refused if self.curve is not None else 0,
            "refused_by_role": (dict(self.curve.refused_by_role) if self.curve is not None
                                else {role: 0 for role in ROLES}),
        }
        status.update(extra)
        status["journal"] = self.journal.stats()
        return status
