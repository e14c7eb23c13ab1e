"""The daemon end to end, in-process on ephemeral ports, with the real OnlineLearner (tiny)."""
from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request

import msgpack
import numpy as np
import pytest
import zmq

from edgecl.client import Connection, RequestRefused, SensorClient, get_status, ping
from edgecl.config import Config
from edgecl.errors import UserError
from edgecl.serve.daemon import SPEC_FILE, Daemon
from edgecl.wire import PROTOCOL_VERSION, ErrorCode, pack, push_header

RNG = np.random.default_rng(0)
DIGITS = RNG.integers(0, 256, (256, 1, 8, 8), dtype=np.uint8)
LABELS = [int(v) for v in RNG.integers(0, 3, 256)]


def make_config(tmp_path, **serve) -> Config:
    config = Config()
    config.serve.port = 0
    config.serve.bind = "127.0.0.1"
    config.serve.state_dir = str(tmp_path / "state")
    config.serve.stats_interval_s = 0.05
    for key, value in serve.items():
        setattr(config.serve, key, value)
    config.learner = {"buffer_size": 20, "seed": 0, "method": "finetune", "threads": 1,
                      "iterations": 1}  # plumbing tests: one optimizer step per batch
    return config


@pytest.fixture
def start_daemon(tmp_path, run_daemons):
    """Start daemons from `make_config(tmp_path, **serve)`; all are stopped after the test."""
    return lambda **serve: run_daemons(make_config(tmp_path, **serve))


def raw_request(address: str, *frames: bytes, timeout_ms: int = 5000) -> dict:
    """Send arbitrary frames on a DEALER and return the single reply."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        sock.send_multipart(list(frames))
        assert sock.poll(timeout_ms), "no reply"
        reply_frames = sock.recv_multipart()
        assert len(reply_frames) == 1
        assert not sock.poll(100), "more than one reply"
        return msgpack.unpackb(reply_frames[0], raw=False, strict_map_key=False)
    finally:
        sock.close()


def push_frames(x, labels, sensor="t", seq=1, **changes) -> list[bytes]:
    return [pack({**push_header(sensor, seq, x, labels), **changes}), x.tobytes()]


def wait_for(predicate, timeout=30.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def test_push_learn_status_end_to_end(start_daemon, tmp_path):
    daemon = start_daemon()
    labels = LABELS[:128]
    labels[:3] = ["cat", "dog", "cat"]  # strings and ints side by side
    with SensorClient(daemon.address, sensor="cam1") as client:
        for start in range(0, 128, 32):
            client.push(DIGITS[start:start + 32], labels[start:start + 32])
    assert client.stats.acked_samples == 128 and client.stats.refused == 0

    status = wait_for(lambda: (s := get_status(daemon.address))["samples_learned"] == 128 and s)
    assert status["samples_received"] == 128
    assert status["queue_depth"] == 0
    assert status["batches_received"] == 4
    assert set(status["classes"]) == set(labels)
    assert status["n_classes"] == len(set(labels))
    assert 0.0 <= status["prequential_acc"] <= 1.0
    assert {e["label"] for e in status["per_class_acc"]} == set(labels)
    assert status["buffer_fill"] == 20 and status["buffer_capacity"] == 20
    assert status["input_spec"] == {"channels": 1, "height": 8, "width": 8, "dtype": "uint8"}
    assert status["sensors"] == 1
    # the spec is recorded in the state dir, for the next run to enforce
    assert json.loads((tmp_path / "state" / SPEC_FILE).read_text())["height"] == 8
    # the status schema survives JSON (labels keep their type inside lists)
    assert json.loads(json.dumps(status))["classes"] == status["classes"]


def test_every_bad_message_gets_its_code_and_the_daemon_keeps_serving(start_daemon):
    daemon = start_daemon(max_batch=64)
    addr = daemon.address
    x = DIGITS[:4]
    assert raw_request(addr, *push_frames(x, [0, 1, 2, 0], seq=1))["ok"]  # fixes the spec

    cases = {
        "garbage header": ([b"\x00\xc1not msgpack"], ErrorCode.BAD_REQUEST),
        "three frames": ([*push_frames(x, [0, 1, 2, 0], seq=2), b"x"], ErrorCode.BAD_REQUEST),
        "push without payload": ([push_frames(x, [0, 1, 2, 0], seq=3)[0]],
                                 ErrorCode.BAD_REQUEST),
        "no version": ([msgpack.packb({"op": "ping"})], ErrorCode.BAD_VERSION),
        "future version": ([pack({"v": PROTOCOL_VERSION + 1, "op": "ping"})],
                           ErrorCode.BAD_VERSION),
        "unknown op": ([pack({"v": PROTOCOL_VERSION, "op": "teleport"})],
                       ErrorCode.UNKNOWN_OP),
        "other image size": (push_frames(DIGITS[:4, :, :4, :4].copy(), [0] * 4, seq=4),
                             ErrorCode.BAD_SHAPE),
        "payload size mismatch": ([push_frames(x, [0] * 4, seq=5)[0], b"\x00" * 10],
                                  ErrorCode.BAD_SHAPE),
        "float after uint8": (push_frames(np.zeros((4, 1, 8, 8), np.float32), [0] * 4, seq=6),
                              ErrorCode.BAD_DTYPE),
        "unknown dtype": (push_frames(x, [0] * 4, seq=7, dtype="int16"), ErrorCode.BAD_DTYPE),
        "float label": (push_frames(x, [0, 1, 2, 0.5], seq=8), ErrorCode.BAD_LABEL),
        "label count": (push_frames(x, [0, 1], seq=9), ErrorCode.BAD_LABEL),
        "too many samples": (push_frames(DIGITS[:65], [0] * 65, seq=10), ErrorCode.TOO_LARGE),
    }
    for name, (frames, code) in cases.items():
        reply = raw_request(addr, *frames)
        assert not reply["ok"], name
        assert reply["error"] == code, (name, reply)
        assert reply["message"], name
    # REQ clients (with the empty delimiter frame) are answered too
    req = zmq.Context.instance().socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(addr)
    req.send(pack({"v": PROTOCOL_VERSION, "op": "ping", "rid": "r1"}))
    assert req.poll(5000)
    assert msgpack.unpackb(req.recv())["rid"] == "r1"
    req.close()
    # still serving: a good push is accepted and only good samples were received
    assert raw_request(addr, *push_frames(x, [0, 1, 2, 0], seq=11))["ok"]
    assert ping(addr)["ok"]
    status = get_status(addr)
    assert status["samples_received"] == 8
    assert status["refused"][ErrorCode.BAD_REQUEST] == 3
    assert status["refused"][ErrorCode.BAD_SHAPE] == 2


def test_a_retried_push_is_acked_again_but_learned_once(start_daemon):
    daemon = start_daemon()
    frames = push_frames(DIGITS[:16], LABELS[:16], sensor="cam", seq=41)
    first = raw_request(daemon.address, *frames)
    second = raw_request(daemon.address, *frames)
    assert first["ok"] and second["ok"]
    assert not first.get("duplicate") and second["duplicate"] is True
    assert first["range"] == second["range"] == [0, 16]
    # the same seq from another sensor is a different push
    other = raw_request(daemon.address,
                        *push_frames(DIGITS[:16], LABELS[:16], sensor="cam2", seq=41))
    assert other["ok"] and not other.get("duplicate") and other["range"] == [16, 32]
    status = wait_for(lambda: (s := get_status(daemon.address))["samples_learned"] == 32 and s)
    time.sleep(0.3)
    status = get_status(daemon.address)
    assert status["samples_learned"] == 32
    assert status["samples_received"] == 32
    assert status["samples_duplicate"] == 16


def test_full_queue_answers_busy_and_loses_nothing(start_daemon):
    """The learner is held inside its first step, so the queue (room for one push) is full."""
    daemon = start_daemon(queue_mb=64 * 64 / 2**20, retry_after_ms=50, learn_batch=16)
    release = threading.Event()
    daemon.add_learner_hook(lambda learner, n, final: final or release.wait(30))
    x = DIGITS[:64]
    assert raw_request(daemon.address, *push_frames(x, LABELS[:64], seq=1))["ok"]
    wait_for(lambda: daemon.samples_learned == 16)  # inside the hook: batch still held
    busy = raw_request(daemon.address, *push_frames(x, LABELS[:64], seq=2))
    assert not busy["ok"] and busy["error"] == ErrorCode.BUSY
    assert busy["retry_after_ms"] == 50 and busy["credit"] == 0 and busy["seq"] == 2
    assert get_status(daemon.address)["queue_depth"] == 48  # status still answers

    # A client pushing into the full queue backs off and retries until the learner frees room.
    # Its second push waits for window room, which needs the first acked: release first.
    threading.Timer(0.3, release.set).start()
    client = SensorClient(daemon.address, sensor="patient", timeout=5)
    started = time.monotonic()
    client.push(x, LABELS[:64])
    client.push(x, LABELS[:64])
    client.close()  # flush: waits for both acks
    assert time.monotonic() - started < 20
    assert client.stats.acked_samples == 128
    assert client.stats.busy >= 1
    wait_for(lambda: get_status(daemon.address)["samples_learned"] == 64 + 128)
    assert get_status(daemon.address)["refused"][ErrorCode.BUSY] == 1 + client.stats.busy


def test_credit_shrinks_as_the_queue_fills(start_daemon):
    daemon = start_daemon(queue_mb=10 * 64 * 64 / 2**20, credit_window=8, max_lag_s=1e9)
    release = threading.Event()
    daemon.add_learner_hook(lambda learner, n, final: final or release.wait(30))
    credits = [raw_request(daemon.address, *push_frames(DIGITS[:64], LABELS[:64], seq=s))
               ["credit"] for s in range(1, 8)]
    release.set()
    assert credits[0] == 8
    assert credits == sorted(credits, reverse=True) and credits[-1] < 8


def test_configured_spec_is_enforced_from_the_first_push(tmp_path):
    config = make_config(tmp_path)
    config.input.channels, config.input.height, config.input.width = 1, 4, 4
    daemon = Daemon(config).start()
    try:
        reply = raw_request(daemon.address, *push_frames(DIGITS[:2], [0, 1]))
        assert reply["error"] == ErrorCode.BAD_SHAPE and "[1, 4, 4]" in reply["message"]
    finally:
        daemon.stop()
        daemon.join(30)
    # and a later run with another configured spec on the same state dir refuses to start
    other = make_config(tmp_path)
    other.input.channels, other.input.height, other.input.width = 3, 4, 4
    with pytest.raises(UserError, match="recorded"):
        Daemon(other)


def test_stop_learns_what_is_queued_then_exits_zero(start_daemon):
    daemon = start_daemon(learn_batch=32)
    with SensorClient(daemon.address, sensor="s") as client:
        for start in range(0, 96, 32):
            client.push(DIGITS[start:start + 32], LABELS[start:start + 32])
    daemon.stop()
    assert daemon.join(60) == 0
    assert daemon.samples_learned == 96 and daemon.queue.samples == 0


def test_shutting_down_refuses_new_pushes(start_daemon):
    daemon = start_daemon()
    release = threading.Event()
    daemon.add_learner_hook(lambda learner, n, final: final or release.wait(30))
    assert raw_request(daemon.address, *push_frames(DIGITS[:32], LABELS[:32], seq=1))["ok"]
    wait_for(lambda: daemon.samples_learned > 0)
    daemon.stop()
    wait_for(lambda: not daemon.accepting)
    reply = raw_request(daemon.address, *push_frames(DIGITS[:32], LABELS[:32], seq=2))
    assert reply["error"] == ErrorCode.SHUTTING_DOWN and reply["retry_after_ms"] > 0
    assert get_status(daemon.address)["accepting"] is False  # status still served while draining
    release.set()
    assert daemon.join(30) == 0


def test_port_in_use_is_a_user_error(tmp_path):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    try:
        config = make_config(tmp_path)
        config.serve.port = blocker.getsockname()[1]
        daemon = Daemon(config)
        with pytest.raises(UserError, match="already in use"):
            daemon.bind()
    finally:
        blocker.close()


def test_announcements_reach_subscribers(start_daemon):
    daemon = start_daemon()
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"snapshot")
    sub.connect(f"tcp://127.0.0.1:{daemon.pub_port}")
    try:
        # PUB drops messages until the subscription has propagated: announce until one arrives
        def received():
            daemon.announce("snapshot", {"version": 3})
            return sub.poll(100)
        wait_for(received, timeout=10, interval=0)
        topic, body = sub.recv_multipart()
        assert topic == b"snapshot"
        assert msgpack.unpackb(body) == {"v": PROTOCOL_VERSION, "topic": "snapshot",
                                         "version": 3}
    finally:
        sub.close()


def test_extension_ops_and_status_fields(start_daemon):
    daemon = start_daemon()
    daemon.register_op("snapshot_info", lambda header, payload: {"version": 7})
    daemon.update_status(snapshot_version=7)
    with Connection(daemon.address) as conn:
        assert conn.request("snapshot_info")["version"] == 7
        with pytest.raises(RequestRefused) as info:
            conn.request("nope")
        assert info.value.code == ErrorCode.UNKNOWN_OP
        assert "snapshot_info" in info.value.message  # the message lists the served ops
    assert get_status(daemon.address)["snapshot_version"] == 7


def test_metrics_endpoint_serves_the_status_figures(start_daemon):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    daemon = start_daemon(metrics_port=port)
    assert raw_request(daemon.address, *push_frames(DIGITS[:32], LABELS[:32]))["ok"]
    raw_request(daemon.address, pack({"v": PROTOCOL_VERSION, "op": "nope"}))
    wait_for(lambda: get_status(daemon.address)["samples_learned"] == 32)
    time.sleep(0.2)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "edgecl_samples_received_total 32.0" in text
    assert "edgecl_samples_learned_total 32.0" in text
    assert 'edgecl_refused_total{code="unknown_op"} 1.0' in text
    assert "edgecl_prequential_accuracy " in text
    assert "edgecl_class_accuracy{label=" in text


def test_metrics_listen_on_loopback_unless_an_address_is_given(start_daemon):
    """/metrics is plain HTTP without auth: serve.bind = 0.0.0.0 must not expose it."""
    for given, expected in ((None, "127.0.0.1"), ("0.0.0.0", "0.0.0.0")):
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        extra = {} if given is None else {"metrics_bind": given}
        daemon = start_daemon(metrics_port=port, bind="0.0.0.0", **extra)
        assert daemon._metrics_server.server_address[0] == expected
        daemon.stop()
        assert daemon.join(30) == 0


def test_a_learner_fault_is_contained_and_reported(start_daemon):
    """Fault injection: one learn_many call raises; the daemon logs it, counts the samples as
    failed, reports the error in status, and keeps learning what follows."""
    daemon = start_daemon(learn_batch=32)
    real = daemon.learner.learn_many
    calls = []

    def flaky(x, y):
        calls.append(len(y))
        if len(calls) == 1:
            raise RuntimeError("injected fault")
        return real(x, y)

    daemon.learner.learn_many = flaky
    for seq in (1, 2):
        assert raw_request(daemon.address, *push_frames(DIGITS[:32], LABELS[:32], seq=seq))["ok"]
    status = wait_for(lambda: (s := get_status(daemon.address))["samples_learned"] == 32 and s)
    assert status["samples_failed"] == 32 and status["queue_depth"] == 0
    assert status["learner_error"] == "RuntimeError: injected fault"
    assert ping(daemon.address)["ok"]
