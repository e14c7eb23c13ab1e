"""`SensorClient`: push labeled samples to the daemon, pipelined up to its credit, resent on
timeout with the same sequence numbers (the Lazy Pirate retry of edgecl.client.connection),
backing off on `busy`. Nothing here imports torch.
"""
from __future__ import annotations

import os
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import zmq

from edgecl.client.connection import DEFAULT_RETRIES, DEFAULT_TIMEOUT_S, LazyPirate, RequestRefused
from edgecl.data import as_sample_array
from edgecl.security import ClientCurve
from edgecl.wire import ErrorCode, pack, plain_label, push_header, unpack_reply

@dataclass
class PushStats:
    """What a SensorClient did, for summaries and tests."""

    pushes: int = 0            # distinct batches sent
    samples: int = 0           # samples in them
    acked_samples: int = 0
    duplicates: int = 0        # acks that said the daemon already had the batch (a retry won)
    retried: int = 0           # resends after a timeout (Lazy Pirate)
    busy: int = 0              # `busy` / `shutting_down` answers, each followed by a resend
    refused: int = 0           # batches the daemon refused for good
    ack_latency_s: list = field(default_factory=list)  # first send to ack, per batch


@dataclass
class _Pending:
    seq: int
    n: int
    frames: list
    first_sent: float
    deadline: float = 0.0
    attempts: int = 0          # timeouts so far
    resend_at: float | None = None  # set while backing off after busy


def _default_sensor() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class SensorClient:
    """Push labeled samples to a daemon.

        with SensorClient("tcp://edge-box:5555", sensor="cam1") as client:
            client.push(frames, labels)   # returns once sent; acks are collected as they come
        # leaving the block waits for every ack

    Batches stay in flight up to the daemon's credit. A batch without a reply within
    `timeout` is resent with the same sequence number on a fresh socket, up to `retries`
    times, then DaemonUnavailable is raised; the daemon learns a resent batch only once.
    A refusal (bad shape, bad label...) raises PushRefused from the push() or flush() call
    that receives it; busy is handled by waiting and resending, never raised.
    """

    def __init__(self, address: str, sensor: str | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT_S, retries: int = DEFAULT_RETRIES,
                 max_in_flight: int = 64, first_seq: int | None = None,
                 context: zmq.Context | None = None, curve: ClientCurve | None = None):
        self.address = address
        self.curve = curve
        self.sensor = sensor or _default_sensor()
        self.timeout = timeout
        self.retries = retries
        self.max_in_flight = max_in_flight
        # Microseconds since the epoch: a restarted sensor with the same name never reuses a
        # sequence number the daemon may still remember.
        self._seq = time.time_ns() // 1000 if first_seq is None else int(first_seq)
        self._link = LazyPirate(context or zmq.Context.instance(), address, curve, timeout,
                                retries)
        self._pending: OrderedDict[int, _Pending] = OrderedDict()
        self._credit = 1  # before the first reply (protocol.md, credit rules)
        self.stats = PushStats()

    # ------------------------------------------------------------------ public API

    def push(self, x, y) -> int:
        """Send one sample (x: (C,H,W) or (H,W), y: a label) or a batch (x: (N,C,H,W) or
        (N,H,W), y: N labels). Waits only for credit. Returns the batch's sequence number."""
        x, labels = _as_batch(x, y)
        self._wait_for_window()
        seq = self._seq
        self._seq += 1
        header = push_header(self.sensor, seq, x, labels)
        now = time.monotonic()
        pending = _Pending(seq, len(labels), [pack(header), x.tobytes()], first_sent=now)
        self._pending[seq] = pending
        self.stats.pushes += 1
        self.stats.samples += pending.n
        self._send(pending, now)
        self._pump(0)
        return seq

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every pushed batch is acked (or raise)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._pending:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{len(self._pending)} batches still unacked")
            self._pump(0.05)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    @property
    def credit(self) -> int:
        return self._credit

    def close(self, flush: bool = True) -> None:
        try:
            if flush:
                self.flush()
        finally:
            self._link.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(flush=exc_type is None)

    # ------------------------------------------------------------------ internals

    def _window(self) -> int:
        return max(1, min(self._credit, self.max_in_flight))

    def _wait_for_window(self) -> None:
        while len(self._pending) >= self._window():
            self._pump(0.05)

    def _send(self, pending: _Pending, now: float) -> None:
        pending.deadline = now + self.timeout
        pending.resend_at = None
        try:
            self._link.sock.send_multipart(pending.frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            pass  # local queue full (daemon away): the timeout path resends it

    def _pump(self, wait_s: float) -> None:
        """Take every reply that is there (waiting up to wait_s for the first), then resend
        what timed out or finished backing off."""
        sock = self._link.sock
        if sock.poll(int(wait_s * 1000)):
            while True:
                try:
                    frame = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._on_reply(unpack_reply(frame))
        self._resend_due()

    def _on_reply(self, reply: dict) -> None:
        pending = self._pending.get(reply.get("seq"))
        if pending is None:
            return  # a late duplicate answer to a batch already settled
        if "credit" in reply:
            self._credit = int(reply["credit"])
        if reply["ok"]:
            del self._pending[pending.seq]
            self.stats.acked_samples += pending.n
            self.stats.ack_latency_s.append(time.monotonic() - pending.first_sent)
            if reply.get("duplicate"):
                self.stats.duplicates += 1
            return
        code = reply.get("error")
        if code in ErrorCode.RETRYABLE:
            self.stats.busy += 1
            delay = reply.get("retry_after_ms", 100) / 1000.0
            pending.resend_at = time.monotonic() + delay
            return
        del self._pending[pending.seq]
        self.stats.refused += 1
        raise RequestRefused(code or "?", reply.get("message", ""), pending.seq)

    def _resend_due(self) -> None:
        now = time.monotonic()
        timed_out = [p for p in self._pending.values()
                     if p.resend_at is None and now > p.deadline]
        if timed_out:
            for p in timed_out:
                p.attempts += 1
            oldest = max(timed_out, key=lambda p: p.attempts)  # the first to run out of tries
            # A fresh socket, then everything unacked resent on it (the old socket's queued
            # messages and late replies are gone with it).
            self._link.timed_out(oldest.attempts,
                                 f"no ack from {self.address} for push seq {oldest.seq}",
                                 f"; {len(self._pending)} batches unacked")
            for p in self._pending.values():
                if p.resend_at is None:
                    self.stats.retried += 1
                    self._send(p, now)
        for p in self._pending.values():
            if p.resend_at is not None and now >= p.resend_at:
                self._send(p, now)


def _as_batch(x, y) -> tuple[np.ndarray, list]:
    """Normalise one sample or a batch to a C-contiguous (N, C, H, W) array and plain labels."""
    single = isinstance(y, (int, str, np.integer, np.str_)) and not isinstance(y, bool)
    x = np.asarray(x)
    if single:
        x = x[None]
        labels = [plain_label(y)]
    else:
        if isinstance(y, (np.ndarray,)):
            y = y.tolist()
        labels = [plain_label(label) for label in y]
    x = as_sample_array(x, allow_hw=True, check_finite=False)
    if x.shape[0] == 0:
        raise ValueError("empty batch: nothing to push")
    if len(labels) != x.shape[0]:
        raise ValueError(f"{x.shape[0]} samples but {len(labels)} labels")
    return np.ascontiguousarray(x), labels


def iter_batches(x: np.ndarray, labels: Sequence[Any], batch: int):
    """Slices of a data set, for pushing."""
    for start in range(0, len(labels), batch):
        yield x[start:start + batch], labels[start:start + batch]

