"""`edgecl serve`: the socket loop and the learner thread, and nothing else.

    sensor --push--> [socket loop: validate -> dedup -> commit (ack)] --queue--> [learner thread]
                      ROUTER :port, PUB :port+1                                   learn_many()

Two threads, two owners:
- The socket loop owns both sockets, the dedup index and the input spec. It never runs torch and
  never calls the learner; it answers every request at once, so `status` stays fast while the
  learner trains.
- The learner thread owns the OnlineLearner. It takes batches from the bounded queue, learns
  them, and every `stats_interval_s` publishes `learner.stats()` as a fresh dict (swapped under
  a lock) for `status` and /metrics to read.

Extension points, for the snapshot and durability work:
- `_commit()` is the single place a push becomes accepted: it appends the push to the journal,
  then queues it; the ack is sent after it returns (docs/durability.md).
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

import errno
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zmq

from edgecl import __version__
from edgecl.config import Config, resolve_state_dir
from edgecl.errors import UserError
from edgecl.files import write_atomic
from edgecl.security import ROLES, server_curve
from edgecl.threads import lower_this_thread
from edgecl.serve.checkpoints import StateKeeper
from edgecl.serve.journal import Journal, StorageError
from edgecl.serve.learning import Learner, OffersToBuffer
from edgecl.serve.queue import Batch, BusyLine, IngestQueue, SeenSequences
from edgecl.wire import (PROTOCOL_VERSION, ErrorCode, InputSpec, WireError, check_frames,
                         check_header, decode_header, decode_push, error_reply, ok_reply,
                         pack, request_rid, show_value)

log = logging.getLogger("edgecl.serve")

SPEC_FILE = "input_spec.json"
ACTIVE_SENSOR_S = 5.0       # a sensor that pushed this recently shares the queue's free room
POLL_MS = 20                # how often the loop looks at stop requests and announcements
MAX_DRAIN_PER_POLL = 256    # requests handled per wake-up: fewer GIL hand-offs under load

MAX_LONG_POLL_MS = 300_000  # longest a long-poll request is held before it must be answered
LEARNER_NICENESS = 5        # the learner and exports yield cores to the socket loop
# How often a thread holding the GIL is asked to let another run (Python's default: 5 ms).
# The learner and export threads hold it in long stretches; a shorter interval lets the
# socket loop answer between them (BENCHMARKS.md, "realtime", on the ack tail).
SWITCH_INTERVAL_S = 0.001
FIRST_STEP_S = 0.4          # assumed step time until the learner has timed one

OpHandler = Callable[[dict, Any], dict]
LearnerHook = Callable[[Any, int, bool], None]


class Daemon:
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

        # Owned by the socket loop (other threads only read them, for status).
        self.samples_received = 0
        self.batches_received = 0
        self.samples_duplicate = 0
        # Every code present from the start: a stable schema, and no dict resizing while the
        # metrics thread copies it.
        self.refused: Counter[str] = Counter({code: 0 for code in ErrorCode.ALL})
        self.accepting = True
        self._next_offset = 0
        self._last_push_by_sensor: dict[str, float] = {}
        self._active_sensors = 1
        self._active_counted_at = 0.0

        self._init_learner_side()
        self._extra_status: dict = {}
        self._classes: set = set()  # labels accepted so far (serve.max_classes)
        self.ready = threading.Event()  # the learner is loaded and every feature started
        self.snapshots = None    # SnapshotService, built by the learner thread when enabled
        self.timeseries = None   # its Recorder, likewise
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

    def _init_learner_side(self) -> None:
        """Fields owned by the learner thread; other threads read them under _stats_lock."""
        self._stats_lock = threading.Lock()
        self._learner_stats: dict = {}
        self.samples_learned = 0
        self.samples_offered = 0   # real-time policy: offered to the replay buffer only
        self.samples_failed = 0
        self.learn_rate: float | None = None  # samples/s the learner can train (see _note_step)
        self._step_s: float | None = None     # seconds per learn step, moving average
        if self.config.serve.overload == "backpressure":  # a first guess until a step is timed
            self.queue.limit_samples = self.lag_samples()
        self.learner_error: str | None = None
        self._learner_hooks: list[LearnerHook] = []
        self.current_batches: list[Batch] = []  # what the learner is on (for learner hooks)
        self._idle_hooks: list[Callable[[Any, int], None]] = []

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

    def _check_learner(self) -> None:
        if self.config.serve.overload == "realtime" and not isinstance(self.learner,
                                                                       OffersToBuffer):
            raise UserError("serve.overload = 'realtime' needs a learner with offer_many(); "
                            "use 'backpressure' with this learner")

    def _load(self) -> None:
        """Learner thread, before learning: build the learner, load the newest checkpoint
        into it and start the features. All the torch work of a start happens here, while
        the socket loop already acks pushes (they queue behind the journal replay)."""
        if self.learner is None:
            from edgecl.learn import OnlineLearner
            self.learner = OnlineLearner(self._learner_config())
            self._check_learner()
        self.keeper.restore_learner()
        self._start_features()
        self.keeper.restore_parts()
        labels = list(self.learner.labels)
        self.call_in_loop(lambda: self.note_classes(labels))
        self.call_in_loop(self.ready.set)  # after the merges queued before it

    def _start_features(self) -> None:
        """The features that ride on the daemon, each registering its ops, hooks and state
        parts through the extension points: snapshots (which bring torch and ONNX in, hence
        the learner thread), with the learner routed through their held-out slice, then the
        time series, which reads the snapshot store."""
        from edgecl.export.service import HeldOutRouter, start_snapshots
        from edgecl.serve.timeseries import start_recorder

        if self.config.snapshots.enabled:
            self.snapshots = start_snapshots(self)
            self.learner = HeldOutRouter(self.learner, self.snapshots.heldout)
        self.timeseries = start_recorder(self, self.snapshots.store if self.snapshots else None)

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
            self.samples_duplicate = max(self.samples_duplicate, duplicates)
            self.batches_received += batches
        self.call_in_loop(merge)

    def _learner_config(self):
        """The configured LearnerConfig; unless `learner.threads` is set, torch gets all cores
        but one, so the socket loop always has a core to answer on (status p99 under load)."""
        learner_config = self.config.learner_config()
        if learner_config.threads is None:
            learner_config.threads = max(1, (os.cpu_count() or 2) - 1)
        return learner_config

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

    def bind(self) -> None:
        """Bind ROUTER on port and PUB on port + 1; port 0 picks a free pair."""
        serve = self.config.serve
        self._ctx = zmq.Context()
        if self.curve is not None:
            self.curve.start(self._ctx)  # the ZAP handler, before any client can connect
        router = self._ctx.socket(zmq.ROUTER)
        pub = self._ctx.socket(zmq.PUB)
        for sock in (router, pub):
            sock.setsockopt(zmq.LINGER, 0)
            if self.curve is not None:
                self.curve.apply(sock, announcements=sock is pub)
        # A hard guard against memory exhaustion; pushes up to max_push_bytes get a proper
        # too_large reply, only absurd messages are dropped by ZeroMQ (the peer is disconnected).
        router.setsockopt(zmq.MAXMSGSIZE, 4 * serve.max_push_bytes + 2**20)
        router.setsockopt(zmq.RCVHWM, 10_000)
        router.setsockopt(zmq.SNDHWM, 10_000)
        try:
            if serve.port:
                self.port = self._bind_one(router, serve.bind, serve.port, "requests (--port)")
                self.pub_port = self._bind_one(pub, serve.bind, serve.port + 1,
                                               "announcements (always --port + 1)")
            else:
                self.port, self.pub_port = self._bind_free_pair(router, pub, serve.bind)
        except BaseException:
            router.close()
            pub.close()
            if self.curve is not None:
                self.curve.stop()
            self._ctx.term()
            raise
        self._router, self._pub = router, pub
        if serve.metrics_port:
            from edgecl.serve.metrics import start_metrics_server
            self._metrics_server = start_metrics_server(serve.metrics_port, serve.metrics_bind,
                                                        self.status)
        log.info("listening on tcp://%s:%d (requests), tcp://%s:%d (announcements)%s",
                 serve.bind, self.port, serve.bind, self.pub_port,
                 f", metrics on http://{serve.metrics_bind}:{serve.metrics_port}/metrics"
                 if serve.metrics_port else "")
        if self.curve is not None:
            log.info("CURVE on: encrypted, admitting the %d client keys in %s",
                     len(self.curve.allowed), self.curve.allowed_dir)
        else:
            log.warning("CURVE is off: traffic is unencrypted and anyone who can reach port %d "
                        "can push and pull; see docs/security.md (serve.require_curve refuses "
                        "this)", self.port)
        self._bound.set()

    @staticmethod
    def _bind_one(sock: zmq.Socket, host: str, port: int, role: str) -> int:
        try:
            sock.bind(f"tcp://{host}:{port}")
        except zmq.ZMQError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UserError(f"port {port} on {host} is already in use, needed for {role}; "
                                "stop the other process or choose another --port") from None
            raise UserError(f"cannot bind tcp://{host}:{port} for {role}: {exc}") from None
        return port

    @staticmethod
    def _bind_free_pair(router: zmq.Socket, pub: zmq.Socket, host: str) -> tuple[int, int]:
        for _ in range(50):
            try:
                port = router.bind_to_random_port(f"tcp://{host}", 20_000, 60_000)
            except zmq.ZMQError as exc:
                raise UserError(f"cannot bind on {host}: {exc}") from None
            try:
                pub.bind(f"tcp://{host}:{port + 1}")
                return port, port + 1
            except zmq.ZMQError:
                router.unbind(router.getsockopt(zmq.LAST_ENDPOINT))
        raise UserError(f"found no free pair of adjacent ports on {host}")

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

    # ----------------------------------------------------------------- the socket loop

    def _socket_loop(self) -> None:
        router = self._router
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        draining_since: float | None = None
        try:
            while True:
                requests = self._stop_requests
                if requests and draining_since is None:
                    draining_since = time.monotonic()
                    self.accepting = False
                    self.queue.close()
                    log.info("shutting down: accepting no more pushes, learning the %d queued "
                             "samples (signal again to stop now)", self.queue.samples)
                if requests >= 2 and not self.queue.abandoned:
                    left = self.queue.abandon()
                    if left:
                        log.warning("stopping now: %d acked samples were not learned; they "
                                    "stay in the journal and are learned at the next start",
                                    left)
                        self.exit_code = 1
                if draining_since is not None and not self._learner_thread.is_alive():
                    break
                if poller.poll(POLL_MS):
                    for _ in range(MAX_DRAIN_PER_POLL):
                        try:
                            frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._handle(frames)
                while self._loop_calls:
                    self._loop_calls.popleft()()
                if self._parked:
                    self._wake_parked()
                while self._announcements:
                    topic, payload = self._announcements.popleft()
                    self._pub.send_multipart(
                        [topic.encode(), pack({"v": PROTOCOL_VERSION, "topic": topic, **payload})])
        finally:
            self._wake_parked(expire_all=True)
            self._close()
        if self.exit_code is None:
            self.exit_code = 0
        log.info("stopped: %d samples received, %d learned", self.samples_received,
                 self.samples_learned)

    def _close(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        for sock in (self._router, self._pub):
            if sock is not None:
                sock.close(linger=0)
        if self.curve is not None:
            self.curve.stop()
        if self._ctx is not None:
            self._ctx.term()
        self.keeper.close()

    def _handle(self, frames: list) -> None:
        """Answer one request with exactly one reply, whatever it contains."""
        # DEALER clients send [identity, header, payload?]; REQ clients add an empty delimiter
        # after the identity. A msgpack header is never empty, so the two cannot be confused.
        if len(frames) >= 2 and len(frames[1]) == 0:
            envelope, body = frames[:2], frames[2:]
        else:
            envelope, body = frames[:1], frames[1:]
        header: dict = {}
        try:
            if not body:
                raise WireError(ErrorCode.BAD_REQUEST, "expected a header frame, got none")
            serve = self.config.serve
            header = decode_header(body[0].bytes, max_bytes=serve.max_header_bytes,
                                   max_depth=serve.max_header_depth)
            header = check_header(header)
            op = header["op"]
            if op != "push" and op not in self._ops and not self.ready.is_set():
                raise WireError(ErrorCode.BUSY, f"the daemon is starting (loading its learner); "
                                f"op '{op}' is served once it is loaded: retry after "
                                f"{self.config.serve.retry_after_ms} ms")
            if op != "push" and op not in self._ops:
                raise WireError(ErrorCode.UNKNOWN_OP,
                                f"unknown op {show_value(op)}; this daemon serves "
                                f"{', '.join(sorted(['push', *self._ops]))}")
            check_frames(op, len(body))  # after the header: even this error echoes rid
            if self.curve is not None:
                self.curve.authorize(op, body[0])  # the sending key's role (docs/security.md)
            payload = body[1].buffer if len(body) == 2 else None
            if op == "push":
                reply = self._op_push(header, payload)
            else:
                fields = self._ops[op](header, payload)
                if fields is None and op in self._long_poll_ops:
                    wait_ms = header.get("wait_ms") or 0
                    deadline = time.monotonic() + min(wait_ms, MAX_LONG_POLL_MS) / 1000
                    self._parked.append((deadline, envelope, header, payload))
                    return
                reply = ok_reply(header.get("rid"), **(fields or {}))
        except WireError as exc:
            self.refused[exc.code] += 1
            retry = {"retry_after_ms": self.config.serve.retry_after_ms} \
                if exc.code == ErrorCode.BUSY else {}
            reply = self._error(header, exc.code, exc.message, **retry)
        except Exception:  # a fault in edgecl: log it, answer, keep serving
            log.exception("internal error handling a request")
            self.refused[ErrorCode.INTERNAL] += 1
            reply = self._error(header, ErrorCode.INTERNAL,
                                "internal error in the daemon; see its log")
        self._router.send_multipart([*envelope, pack(reply)], copy=False)

    def _wake_parked(self, expire_all: bool = False) -> None:
        """Ask held long-poll handlers again; a request whose wait is over gets its answer."""
        now = time.monotonic()
        parked, self._parked = self._parked, []
        for deadline, envelope, header, payload in parked:
            expired = expire_all or now >= deadline
            try:
                handler = self._ops[header["op"]]
                fields = handler({**header, "wait_ms": 0} if expired else header, payload)
                if fields is None:
                    self._parked.append((deadline, envelope, header, payload))
                    continue
                reply = ok_reply(header.get("rid"), **fields)
            except WireError as exc:
                self.refused[exc.code] += 1
                reply = self._error(header, exc.code, exc.message)
            except Exception:
                log.exception("internal error answering a held request")
                self.refused[ErrorCode.INTERNAL] += 1
                reply = self._error(header, ErrorCode.INTERNAL,
                                    "internal error in the daemon; see its log")
            self._router.send_multipart([*envelope, pack(reply)], copy=False)

    @staticmethod
    def _error(header: dict, code: str, message: str, **fields) -> dict:
        seq = header.get("seq")
        if type(seq) is int:
            fields["seq"] = seq
        return error_reply(code, message, request_rid(header), **fields)

    def _op_ping(self, header: dict, payload) -> dict:
        return {"op": "pong", "protocol": PROTOCOL_VERSION, "version": __version__,
                "credit": self.config.serve.credit_window}

    def _op_status(self, header: dict, payload) -> dict:
        return {"status": self.status()}

    def _op_push(self, header: dict, payload) -> dict:
        serve = self.config.serve
        request = decode_push(header, payload, max_samples=serve.max_batch,
                              max_bytes=serve.max_push_bytes, spec=self.spec,
                              max_label_chars=serve.max_label_chars)
        rid = header.get("rid")
        previous = self.seen.lookup(request.sensor, request.seq)
        if previous is not None:
            first, n = previous
            self.samples_duplicate += n
            self.keeper.note_duplicates(self.samples_duplicate)
            return ok_reply(rid, seq=request.seq, n=n, range=[first, first + n],
                            duplicate=True, credit=self._credit(request.x.nbytes, n))
        if not self.accepting:
            self.refused[ErrorCode.SHUTTING_DOWN] += 1
            return self._error(header, ErrorCode.SHUTTING_DOWN,
                               "the daemon is shutting down; nothing was accepted",
                               retry_after_ms=1000)
        new_classes = self._check_classes(request.labels)
        batch = Batch(request.sensor, request.seq, request.x, request.labels,
                      first=self._next_offset)
        if not self._commit(batch):
            self.busy_line.refused(request.sensor, batch.accepted_at)
            self.refused[ErrorCode.BUSY] += 1
            return self._error(header, ErrorCode.BUSY,
                               f"queue full ({self.queue.samples} samples waiting to be "
                               f"learned, {len(self.busy_line)} sensors in line); nothing "
                               f"was accepted, retry after {serve.retry_after_ms} ms: "
                               "sensors are admitted in the order they were refused",
                               retry_after_ms=serve.retry_after_ms, credit=0)
        if self.spec is None:
            self._fix_spec(request.spec)
        self._classes |= new_classes
        self.seen.record(request.sensor, request.seq, batch.first, batch.n)
        self._next_offset += batch.n
        self.samples_received += batch.n
        self.batches_received += 1
        self._last_push_by_sensor[request.sensor] = batch.accepted_at
        return ok_reply(rid, seq=request.seq, n=batch.n, range=[batch.first,
                                                                 batch.first + batch.n],
                        credit=self._credit(batch.nbytes, batch.n))

    def _commit(self, batch: Batch) -> bool:
        """Make a push accepted, or return False (queue full) or raise `storage` (the journal
        could not be written) having accepted nothing.

        The ack is sent only after this returns True. Durability goes here: check room (and
        the sensor's turn, if others were refused before it), append the batch to the journal,
        then put it on the queue (room cannot vanish in between: only this thread puts). Dedup
        state is recorded by the caller after this succeeds.
        """
        if not self.queue.has_room(batch.nbytes, batch.n):
            return False
        fits = max(1, self.queue.free_batches(batch.nbytes, batch.n))
        if not self.busy_line.admits(batch.sensor, fits, batch.accepted_at):
            return False
        try:
            self.journal.append(batch)
        except StorageError as exc:
            raise WireError(ErrorCode.STORAGE, f"{exc}; nothing was accepted. The daemon still "
                                               "answers status; retry once the disk is fixed")
        return self.queue.try_put(batch)

    def _check_classes(self, labels: list) -> set:
        """The labels in this push the daemon has not accepted before; too_many_classes if
        they would take it past serve.max_classes (every new class widens the model's head)."""
        new = set(labels) - self._classes
        limit = self.config.serve.max_classes
        if new and len(self._classes) + len(new) > limit:
            raise WireError(ErrorCode.TOO_MANY_CLASSES,
                            f"this push brings {len(new)} new classes; the daemon has "
                            f"{len(self._classes)} and learns at most {limit} "
                            "(serve.max_classes)")
        return new

    def note_classes(self, labels) -> None:
        """Count labels accepted outside a push (the journal and the checkpoint at start)
        toward the limit."""
        self._classes.update(labels)

    def _credit(self, batch_bytes: int, batch_n: int) -> int:
        """Pushes this client may have unacknowledged: the window, cut down so that all active
        sensors together cannot overfill the free room in the queue."""
        now = time.monotonic()
        if now - self._active_counted_at > 1.0:
            recent = {s: t for s, t in self._last_push_by_sensor.items()
                      if now - t < ACTIVE_SENSOR_S}
            self._last_push_by_sensor = recent
            self._active_sensors = max(1, len(recent))
            self._active_counted_at = now
        fits = self.queue.free_batches(batch_bytes, batch_n)
        return int(max(0, min(self.config.serve.credit_window, fits // self._active_sensors)))

    # ----------------------------------------------------------------- the input spec

    def _resolve_spec(self, configured: InputSpec | None) -> InputSpec | None:
        """The spec from config, else the one recorded in the state dir by an earlier run."""
        path = self.state_dir / SPEC_FILE
        recorded = None
        if path.exists():
            try:
                recorded = InputSpec(**json.loads(path.read_text()))
            except (ValueError, TypeError) as exc:
                raise UserError(f"{path} is damaged ({exc}); delete it to take the input spec "
                                "from the next push") from None
        if configured and recorded and configured != recorded:
            raise UserError(f"the configured input {configured.as_dict()} differs from "
                            f"{recorded.as_dict()} recorded in {path}; use another --state-dir "
                            "or delete that file")
        spec = configured or recorded
        if spec is not None and spec != recorded:
            try:
                self._write_spec(spec)
            except OSError as exc:
                raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
        return spec

    def _fix_spec(self, spec: InputSpec) -> None:
        self.spec = spec
        try:
            self._write_spec(spec)
        except OSError as exc:  # the push is already journaled and acked: keep serving
            log.error("cannot record the input spec in %s (%s); it holds for this run",
                      self.state_dir / SPEC_FILE, exc.strerror or exc)
        log.info("input spec fixed by the first push: %s", spec.as_dict())

    def _write_spec(self, spec: InputSpec) -> None:
        write_atomic(self.state_dir / SPEC_FILE, json.dumps(spec.as_dict()).encode())

    # ----------------------------------------------------------------- the learner thread

    def _learn_loop(self) -> None:
        """The only code that touches the learner. Ends when the queue is closed and drained.

        learn_many errors are contained per step (see _learn). Anything else escaping here is a
        bug in edgecl: the daemon then stops (exit 1) rather than ack samples it can never learn.
        """
        lower_this_thread(LEARNER_NICENESS)
        try:
            try:
                self._load()
            except UserError as exc:  # a checkpoint that does not load, ...: one line, exit 2
                log.error("%s", exc)
                self.load_error = str(exc)
                self.exit_code = 2
                self.stop()
                self.stop()
                self.queue.abandon()
                return
            self._learn_until_drained()
        except Exception as exc:
            log.exception("learner thread crashed; stopping the daemon")
            if not self.ready.is_set():
                self.load_error = f"the learner could not be loaded: {type(exc).__name__}: {exc}"
            with self._stats_lock:
                self.learner_error = f"{type(exc).__name__}: {exc}"
            self.exit_code = 1
            self.stop()
            self.stop()
            self.queue.abandon()

    def _learn_until_drained(self) -> None:
        interval = self.config.serve.stats_interval_s
        last_published = 0.0
        self._replay_journal()
        while True:
            self._offer_backlog()
            batches = self.queue.take(self.config.serve.learn_batch, timeout=interval)
            if batches is None:
                break
            if batches:
                self._consume(batches, self._learn)
            else:
                for hook in self._idle_hooks:
                    self._run_idle_hook(hook)
                self.keeper.maybe_save()
            now = time.monotonic()
            if now - last_published >= interval:
                self._publish_stats()
                last_published = now
        for hook in self._learner_hooks:
            self._run_hook(hook, final=True)
        self.keeper.save()
        self._publish_stats()

    def _replay_journal(self) -> None:
        """The journaled pushes no checkpoint covers, under the configured overload policy."""
        realtime = self.config.serve.overload == "realtime"
        self.keeper.replay(self._learn, self.config.serve.learn_batch,
                           stopped=lambda: self.queue.abandoned,
                           offer=self._offer if realtime else None,
                           keep_samples=self.lag_samples())

    def _consume(self, batches: list[Batch], how: Callable[[list[Batch]], None]) -> None:
        """Learn or offer `batches`, then mark them consumed (checkpoint record, queue room)."""
        how(batches)
        self.keeper.learned(batches)
        self.queue.done(batches)
        self.keeper.maybe_save()

    def lag_samples(self) -> int:
        """serve.max_lag_s of learning, in samples, at the measured rate (before the first
        step is timed, at an assumed FIRST_STEP_S per step)."""
        serve = self.config.serve
        rate = self.learn_rate or serve.learn_batch / FIRST_STEP_S
        return max(serve.learn_batch, int(min(serve.max_lag_s * rate, 2**62)))

    def _offer_backlog(self) -> None:
        """The real-time policy: pushes further behind than max_lag_s of learning go to the
        replay buffer only, so the learner trains on the recent stream (docs/overload.md)."""
        if self.config.serve.overload != "realtime":
            return
        behind = self.queue.take_behind(self.lag_samples())
        if behind:
            self._consume(behind, self._offer)

    def _offer(self, batches: list[Batch]) -> None:
        x, labels = _joined(batches)
        try:
            self.learner.offer_many(x, labels)
            failed = 0
        except Exception as exc:  # contained like a failed learn step
            log.exception("offering %d samples to the replay buffer failed", len(labels))
            failed = len(labels)
            with self._stats_lock:
                self.learner_error = f"{type(exc).__name__}: {exc}"
        with self._stats_lock:
            self.samples_offered += len(labels) - failed
            self.samples_failed += failed

    def _learn(self, batches: list[Batch]) -> None:
        """One learn_many call (one optimizer step) per `learn_batch` samples: small pushes are
        merged, large ones split, so the step size does not depend on how sensors batch."""
        self.current_batches = batches
        x, labels = _joined(batches)
        size = self.config.serve.learn_batch
        for start in range(0, len(labels), size):
            started = time.perf_counter()
            chunk_labels = labels[start:start + size]
            n = len(chunk_labels)
            try:
                self.learner.learn_many(x[start:start + size], chunk_labels)
                failed = 0
            except Exception as exc:  # a learner fault must not kill the daemon; it is logged
                log.exception("learner failed on %d samples", n)
                failed = n
                with self._stats_lock:
                    self.learner_error = f"{type(exc).__name__}: {exc}"
            with self._stats_lock:
                self.samples_learned += n - failed
                self.samples_failed += failed
            for hook in self._learner_hooks:
                self._run_hook(hook, final=False)
            self._note_step(time.perf_counter() - started)

    def _note_step(self, seconds: float) -> None:
        """What the learner can train: learn_batch samples per step at the moving average of
        its step time (hooks included). A step on a part-filled batch costs about as much as
        on a full one, so samples/s measured on a thin stream would understate it. Under
        backpressure it bounds the queue to max_lag_s of learning."""
        self._step_s = seconds if self._step_s is None else 0.8 * self._step_s + 0.2 * seconds
        self.learn_rate = self.config.serve.learn_batch / max(self._step_s, 1e-6)
        if self.config.serve.overload == "backpressure":
            self.queue.limit_samples = self.lag_samples()

    def _run_hook(self, hook: LearnerHook, final: bool) -> None:
        try:
            hook(self.learner, self.samples_learned, final)
        except Exception:
            log.exception("learner hook %r failed", hook)

    def _run_idle_hook(self, hook) -> None:
        try:
            hook(self.learner, self.samples_learned)
        except Exception:
            log.exception("idle hook %r failed", hook)

    def _publish_stats(self) -> None:
        try:
            stats = self.learner.stats()
        except Exception:
            log.exception("learner.stats() failed")
            return
        with self._stats_lock:
            self._learner_stats = stats

    # ----------------------------------------------------------------- status

    def status(self) -> dict:
        """The figures behind `edgecl status` and /metrics; cheap, callable from any thread.

        Keys are a stable schema (docs/protocol.md); labels keep their type, so per-class
        accuracy is a list of {label, acc} rather than a map keyed by label.
        """
        with self._stats_lock:
            stats = self._learner_stats
            learned, failed = self.samples_learned, self.samples_failed
            offered = self.samples_offered
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
            "samples_received": self.samples_received,
            "samples_learned": learned,
            "samples_offered": offered,
            "samples_failed": failed,
            "samples_duplicate": self.samples_duplicate,
            "batches_received": self.batches_received,
            "queue_depth": self.samples_received - learned - offered - failed,
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


def _joined(batches: list[Batch]) -> tuple[np.ndarray, list]:
    """The samples and labels of `batches` as one array and one list (no copy for one)."""
    if len(batches) == 1:
        return batches[0].x, batches[0].labels
    return (np.concatenate([b.x for b in batches]),
            [label for b in batches for label in b.labels])
