"""SensorClient behaviour that needs control over the daemon's replies: a scripted ROUTER stands
in for it (no learner here; the real daemon is covered in test_daemon.py)."""
from __future__ import annotations

import threading

import msgpack
import numpy as np
import pytest
import zmq

from edgecl.client import DaemonUnavailable, PushRefused, SensorClient, _as_batch
from edgecl.wire import ErrorCode, error_reply, ok_reply, pack


class ScriptedDaemon:
    """A ROUTER that answers pushes via `decide(header) -> reply dict | None` (None: stay
    silent, as if the reply was lost) and records every header it saw."""

    def __init__(self, decide):
        self.decide = decide
        self.headers: list[dict] = []
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self.port = self._sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            if not self._sock.poll(20):
                continue
            identity, header_frame, *payload = self._sock.recv_multipart()
            header = msgpack.unpackb(header_frame, raw=False)
            self.headers.append(header)
            reply = self.decide(header)
            if reply is not None:
                self._sock.send_multipart([identity, pack(reply)])

    def close(self):
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


@pytest.fixture
def scripted():
    servers = []

    def make(decide):
        server = ScriptedDaemon(decide)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


X = np.zeros((4, 1, 2, 2), np.uint8)


def test_lost_reply_is_retried_with_the_same_seq(scripted):
    seen = []

    def decide(header):
        seen.append(header["seq"])
        if len(seen) == 1:
            return None  # lose the first reply
        return ok_reply(seq=header["seq"], n=4, range=[0, 4], credit=4,
                        duplicate=len(seen) > 1)

    server = scripted(decide)
    client = SensorClient(server.address, sensor="s", timeout=0.3, retries=3, first_seq=100)
    client.push(X, [0, 1, 2, 3])
    client.close()
    assert seen == [100, 100]
    assert client.stats.retried == 1 and client.stats.acked_samples == 4
    assert client.stats.duplicates == 1


def test_busy_backs_off_then_resends_the_same_batch(scripted):
    replies = iter([error_reply(ErrorCode.BUSY, "full", retry_after_ms=50, credit=0)])

    def decide(header):
        return next(replies, None) or ok_reply(seq=header["seq"], n=4, range=[0, 4], credit=2)

    server = scripted(lambda h: {**decide(h), "seq": h["seq"]})
    client = SensorClient(server.address, sensor="s", timeout=2, first_seq=5)
    client.push(X, [0, 1, 2, 3])
    client.close()
    assert [h["seq"] for h in server.headers] == [5, 5]
    assert client.stats.busy == 1 and client.stats.retried == 0
    assert client.stats.acked_samples == 4


def test_refusal_raises_with_code_and_seq(scripted):
    server = scripted(lambda h: error_reply(ErrorCode.BAD_SHAPE, "samples are [1, 2, 2] but "
                                            "this daemon learns [1, 28, 28]", seq=h["seq"]))
    client = SensorClient(server.address, sensor="s", timeout=2, first_seq=9)
    with pytest.raises(PushRefused) as info:  # from push() or flush(), whichever gets it
        client.push(X, [0, 1, 2, 3])
        client.flush()
    assert info.value.code == ErrorCode.BAD_SHAPE and info.value.seq == 9
    assert "28, 28" in str(info.value)
    assert client.stats.refused == 1 and client.in_flight == 0
    client.close()


def test_pipelines_up_to_the_credit(scripted):
    held = []

    def decide(header):
        held.append(header["seq"])
        return ok_reply(seq=header["seq"], n=4, range=[0, 4], credit=3)

    server = scripted(decide)
    client = SensorClient(server.address, sensor="s", timeout=2, first_seq=0)
    client.push(X, [0] * 4)
    client.flush()
    assert client.credit == 3
    for _ in range(6):
        client.push(X, [0] * 4)
        assert client.in_flight <= 3
    client.close()
    assert client.stats.acked_samples == 28
    assert sorted(held) == list(range(7))


def test_no_daemon_raises_unavailable():
    ctx = zmq.Context.instance()
    probe = ctx.socket(zmq.ROUTER)
    port = probe.bind_to_random_port("tcp://127.0.0.1")
    probe.close()  # nothing listens there now
    client = SensorClient(f"tcp://127.0.0.1:{port}", sensor="s", timeout=0.1, retries=1)
    with pytest.raises(DaemonUnavailable, match="no ack"):
        client.push(X, [0] * 4)
        client.flush(timeout=5)
    client.close(flush=False)


def test_single_samples_and_plain_labels():
    x, labels = _as_batch(np.zeros((2, 2), np.uint8), np.int64(3))
    assert x.shape == (1, 1, 2, 2) and labels == [3] and type(labels[0]) is int
    x, labels = _as_batch(np.zeros((3, 2, 2)), np.array(["a", "b", "c"]))
    assert x.shape == (3, 1, 2, 2) and x.dtype == np.float32 and labels == ["a", "b", "c"]
    with pytest.raises(TypeError):
        _as_batch(np.zeros((1, 1, 2, 2), np.uint8), [1.5])
    with pytest.raises(ValueError, match="labels"):
        _as_batch(np.zeros((2, 1, 2, 2), np.uint8), [1])
