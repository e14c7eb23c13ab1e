"""The socket loop of `edgecl serve`: it owns both sockets, the dedup record, the received
side of the stream counts (edgecl/serve/counters.py: samples, pushes, duplicates, the next
stream offset) and the input spec, and never runs torch nor calls the learner.

    sensor --push--> [validate -> dedup -> commit: journal, queue (ack)] --queue--> learner

It answers every request at once, so `status` stays fast while the learner trains.
`_commit()` is the single place a push becomes accepted (docs/durability.md). `Ingest` is
one half of `edgecl.serve.daemon.Daemon`, whose __init__ sets the state it works on.
"""
from __future__ import annotations

import errno
import json
import logging
import time

import zmq

from edgecl import __version__
from edgecl.errors import UserError
from edgecl.files import write_atomic
from edgecl.serve.journal import StorageError
from edgecl.serve.queue import Batch
from edgecl.wire import (PROTOCOL_VERSION, ErrorCode, InputSpec, WireError, check_frames,
                         check_header, decode_header, decode_push, error_reply, ok_reply,
                         pack, request_rid, show_value)

log = logging.getLogger("edgecl.serve")

SPEC_FILE = "input_spec.json"
ACTIVE_SENSOR_S = 5.0       # a sensor that pushed this recently shares the queue's free room
POLL_MS = 20                # how often the loop looks at stop requests and announcements
MAX_DRAIN_PER_POLL = 256    # requests handled per wake-up: fewer GIL hand-offs under load
MAX_LONG_POLL_MS = 300_000  # longest a long-poll request is held before it must be answered


class Ingest:
    """The socket loop's methods: bind, answer, accept pushes, fix the input spec."""

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
                retry = {"retry_after_ms": self.config.serve.retry_after_ms} \
                    if exc.code == ErrorCode.BUSY else {}
                reply = self._error(header, exc.code, exc.message, **retry)
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
            self.counts.samples_duplicate += n
            self.keeper.note_duplicates(self.counts.samples_duplicate)
            return ok_reply(rid, seq=request.seq, n=n, range=[first, first + n],
                            duplicate=True, credit=self._credit(request.x.nbytes, n))
        if not self.accepting:
            self.refused[ErrorCode.SHUTTING_DOWN] += 1
            return self._error(header, ErrorCode.SHUTTING_DOWN,
                               "the daemon is shutting down; nothing was accepted",
                               retry_after_ms=1000)
        new_classes = self._check_classes(request.labels)
        batch = Batch(request.sensor, request.seq, request.x, request.labels,
                      first=self.counts.next_offset)
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
        self.counts.accepted(batch.n)
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
