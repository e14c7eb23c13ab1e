"""One request, one reply, to the daemon: the client sockets, the Lazy Pirate retry they all
use, and the errors every client raises.

- `LazyPirate` is the one retry rule (zguide ch. 4): on a timeout, close the socket, open a
  fresh one (the old one's queued requests and late replies go with it) and let the caller
  resend, up to `retries` times; then `DaemonUnavailable`. The sensor, the device and
  `Connection` all retry through it.
- `Connection` is synchronous request/reply: `status`, `ping`, the snapshot ops.

Speaks docs/protocol.md over a DEALER socket; nothing here imports torch.
"""
from __future__ import annotations

import itertools
import time

import zmq

from edgecl.security import ClientCurve
from edgecl.wire import PROTOCOL_VERSION, pack, unpack_reply

DEFAULT_TIMEOUT_S = 2.5
DEFAULT_RETRIES = 3


class DaemonError(Exception):
    """Base of the errors a client raises about the daemon."""


class DaemonUnavailable(DaemonError):
    """No reply after every retry: the daemon is down, unreachable, or the address is wrong."""


class RequestRefused(DaemonError):
    """The daemon answered with an error it will give again for the same request."""

    def __init__(self, code: str, message: str, seq: int | None = None):
        where = f" (push seq {seq})" if seq is not None else ""
        super().__init__(f"daemon refused{where}: {code}: {message}")
        self.code = code
        self.message = message
        self.seq = seq


# The name sensors see in their own code.
PushRefused = RequestRefused


def new_socket(ctx: zmq.Context, address: str, curve: ClientCurve | None = None,
               kind: int = zmq.DEALER) -> zmq.Socket:
    """A connected client socket; with `curve`, CURVE-encrypted and authenticated by key (a
    daemon that does not admit the key never answers: the caller's timeout decides)."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        curve.apply(sock)
    sock.connect(address)
    return sock


class LazyPirate:
    """A DEALER socket to `address` that is replaced by a fresh one after each timeout, until
    `retries` timeouts in a row say the daemon is not there."""

    def __init__(self, ctx: zmq.Context, address: str, curve: ClientCurve | None,
                 timeout: float, retries: int):
        self.address = address
        self.timeout = timeout
        self.retries = retries
        self._ctx = ctx
        self._curve = curve
        self.sock = new_socket(ctx, address, curve)

    def timed_out(self, tries: int, what: str, hint: str = "") -> None:
        """The `tries`-th try in a row got no reply. More than `retries`: raise
        DaemonUnavailable ("{what} after N tries of T s{hint}"); else reopen the socket, on
        which the caller resends."""
        if tries > self.retries:
            raise DaemonUnavailable(f"{what} after {tries} tries of {self.timeout:g} s{hint}")
        self.reopen()

    def reopen(self) -> None:
        self.sock.close(linger=0)
        self.sock = new_socket(self._ctx, self.address, self._curve)

    def close(self) -> None:
        self.sock.close(linger=0)


class Connection:
    """Synchronous request/reply with Lazy Pirate retries: on timeout, a fresh socket and the
    same request again, up to `retries` times."""

    def __init__(self, address: str, timeout: float = DEFAULT_TIMEOUT_S,
                 retries: int = DEFAULT_RETRIES, context: zmq.Context | None = None,
                 curve: ClientCurve | None = None):
        self.address = address
        self.timeout = timeout
        self.retries = retries
        self.curve = curve
        self._link = LazyPirate(context or zmq.Context.instance(), address, curve, timeout,
                                retries)
        self._rids = itertools.count(1)

    def request(self, op: str, payload: bytes | None = None, **fields) -> dict:
        """Send one request and return the ok reply; RequestRefused on an error reply. A
        `busy` reply (a full queue, a daemon still loading) is retried after its
        `retry_after_ms` for as long as the timeouts of every try would have lasted."""
        rid = next(self._rids)
        frames = [pack({"v": PROTOCOL_VERSION, "op": op, "rid": rid, **fields})]
        if payload is not None:
            frames.append(payload)
        busy_until = time.monotonic() + self.timeout * (self.retries + 1)
        tries = 0
        while True:
            reply = self._try(frames, rid)
            if reply is None:
                tries += 1
                self._link.timed_out(tries, f"no reply from {self.address} to {op!r}",
                                     "; is `edgecl serve` running there?")
            elif reply["ok"]:
                return reply
            elif reply.get("error") == "busy" and time.monotonic() < busy_until:
                time.sleep(min(5.0, max(0.01, reply.get("retry_after_ms", 100) / 1000)))
            else:
                raise RequestRefused(reply.get("error", "?"), reply.get("message", ""))

    def _try(self, frames: list, rid: int) -> dict | None:
        """Send once; the reply to this request, or None if none came within the timeout."""
        sock = self._link.sock
        sock.send_multipart(frames)
        deadline = time.monotonic() + self.timeout
        while (left := deadline - time.monotonic()) > 0:
            if not sock.poll(int(left * 1000) + 1):
                return None
            reply = unpack_reply(sock.recv())
            if reply.get("rid") == rid:
                return reply  # anything else is a late answer to an earlier attempt
        return None

    def close(self) -> None:
        self._link.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def get_status(address: str, timeout: float = DEFAULT_TIMEOUT_S,
               retries: int = DEFAULT_RETRIES, curve: ClientCurve | None = None) -> dict:
    """The daemon's status dict (schema in docs/protocol.md)."""
    with Connection(address, timeout, retries, curve=curve) as conn:
        return conn.request("status")["status"]


def ping(address: str, timeout: float = DEFAULT_TIMEOUT_S, retries: int = 0,
         curve: ClientCurve | None = None) -> dict:
    with Connection(address, timeout, retries, curve=curve) as conn:
        return conn.request("ping")
