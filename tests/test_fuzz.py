"""Hostile input: thousands of generated malformed requests at one live daemon. It must answer
every one with the right error code, count each in `status`, accept none of them, and then
learn valid traffic as if nothing had happened. The messages are in tests/fuzz_messages.py;
benchmarks/fuzz.py runs the same generator for longer."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings

from edgecl.client import SensorClient, get_status
from edgecl.learn import LearnerConfig, OnlineLearner
from edgecl.wire import ErrorCode, pack
from fuzz_messages import OK, SHAPE, FuzzRun, fuzz_config, malformed, publish_fake_snapshot

N_MESSAGES = 2000


def finite_model(learner) -> bool:
    return all(torch.isfinite(t).all() for t in learner.student.state_dict().values()
               if t.is_floating_point())


def test_malformed_requests_all_get_their_code_and_valid_traffic_still_learns(tmp_path,
                                                                             run_daemons):
    daemon = run_daemons(fuzz_config(str(tmp_path / "state")))
    publish_fake_snapshot(daemon)
    before = get_status(daemon.address)["refused"]
    run = FuzzRun(daemon.address)

    @settings(max_examples=N_MESSAGES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(malformed)
    def fire(message):
        frames, expected = message
        run.send(frames, expected)

    try:
        fire()
    finally:
        run.close()
    assert run.sent >= N_MESSAGES
    assert not run.mismatches, f"{len(run.mismatches)} wrong codes:\n" + "\n".join(
        run.mismatches[:10])
    # every code a malformed message can earn was earned, so every check was reached
    assert set(run.codes) >= {ErrorCode.BAD_REQUEST, ErrorCode.BAD_VERSION,
                              ErrorCode.UNKNOWN_OP, ErrorCode.BAD_SHAPE, ErrorCode.BAD_DTYPE,
                              ErrorCode.BAD_VALUE, ErrorCode.BAD_LABEL, ErrorCode.TOO_LARGE,
                              ErrorCode.TOO_MANY_CLASSES, OK}

    status = get_status(daemon.address)
    counted = {code: status["refused"][code] - before.get(code, 0) for code in status["refused"]}
    assert counted == {code: run.codes.get(code, 0) for code in status["refused"]}
    assert status["samples_received"] == 0 and status["batches_received"] == 0

    # valid traffic afterwards is accepted and learned
    x = np.random.default_rng(0).random((40, *SHAPE), dtype=np.float32)
    y = [i % 4 for i in range(40)]
    with SensorClient(daemon.address, sensor="after-fuzz") as client:
        for start in range(0, 40, 8):
            client.push(x[start:start + 8], y[start:start + 8])
    assert client.stats.acked_samples == 40
    deadline = time.monotonic() + 30
    while get_status(daemon.address)["samples_learned"] < 40:
        assert time.monotonic() < deadline, "valid samples were not learned"
        time.sleep(0.05)
    status = get_status(daemon.address)
    assert status["samples_learned"] == 40 and status["samples_failed"] == 0
    assert daemon.join(0) is None, "the daemon stopped"
    assert finite_model(daemon.learner)


def test_a_step_whose_loss_is_not_finite_is_skipped_and_counted():
    """The daemon refuses NaN input at the wire and the learner refuses it too; a finite but
    overflowing batch still gives a non-finite loss, and that step is skipped: no weight or
    BatchNorm statistic moves and nothing enters the replay buffer."""
    rng = np.random.default_rng(0)
    x = rng.random((8, *SHAPE), dtype=np.float32)
    y = [0, 1] * 4
    learner = OnlineLearner(LearnerConfig(method="derpp+ewcpp", buffer_size=20, threads=1))
    learner.learn_many(x, y)
    state = {k: t.detach().clone() for k, t in learner.student.state_dict().items()}
    buffered = len(learner.buffer)

    poisoned = x.copy()
    poisoned[3, 0, 2, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        learner.learn_many(poisoned, y)
    out = learner.learn_many(np.full_like(x, 3e38), y)
    assert not np.isfinite(out["loss"])
    assert learner.skipped_steps == 1 and learner.stats()["skipped_steps"] == 1
    assert len(learner.buffer) == buffered
    for name, t in learner.student.state_dict().items():
        assert torch.equal(t, state[name]), f"{name} moved on a skipped step"

    out = learner.learn_many(x, y)
    assert np.isfinite(out["loss"]) and learner.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in learner.student.parameters())


@pytest.mark.parametrize("lr", [1e3, 1e12])
def test_an_absurd_learning_rate_never_makes_the_model_nan(lr):
    """Finite losses whose updates overflow (or whose BatchNorm variance overflows) are
    skipped like non-finite ones, so the weights and running statistics stay finite."""
    rng = np.random.default_rng(0)
    x = rng.random((8, *SHAPE), dtype=np.float32)
    learner = OnlineLearner(LearnerConfig(method="derpp+ewcpp", buffer_size=20, threads=1, lr=lr))
    for _ in range(20):
        learner.learn_many(x, [0, 1] * 4)
    assert learner.skipped_steps > 0
    assert all(torch.isfinite(t).all() for t in learner.student.state_dict().values()
               if t.is_floating_point())
    assert len(learner.predict_many(x)) == 8


def test_a_msgpack_bomb_is_refused_before_msgpack_allocates_for_it():
    """4,000 nested arrays each declaring 20,000 items: 20 KB on which plain msgpack.unpackb
    preallocates 82 MB of list slots before it finds out the items are not there."""
    import struct
    import tracemalloc

    import pytest

    from edgecl.wire import WireError, unpack_header

    bomb = (b"\xdd" + struct.pack(">I", 20_000)) * 4000
    for frame, limit in ((bomb, 8), (b"\xdd" + struct.pack(">I", 2**32 - 1), 8),
                         (b"\x91" * 9 + b"\x00", 8)):
        tracemalloc.start()
        try:
            with pytest.raises(WireError) as info:
                unpack_header(frame, max_depth=limit)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert info.value.code == ErrorCode.BAD_REQUEST
        assert peak < 256 * 1024, f"{peak} bytes allocated for a {len(frame)}-byte header"


# ------------------------------------------------------------------------------ regressions
# Each test below is one place where an independent client (written from docs/protocol.md)
# got an answer the protocol does not promise.

def _raw(address, *frames):
    from test_daemon import raw_request
    return raw_request(address, *frames)


def _ping(**fields) -> bytes:
    return pack({"v": 1, "op": "ping", **fields})


@pytest.fixture
def fuzz_daemon(tmp_path, run_daemons):
    daemon = run_daemons(fuzz_config(str(tmp_path / "state")))
    publish_fake_snapshot(daemon)
    return daemon


def test_a_dtype_of_any_type_is_bad_dtype_never_internal(fuzz_daemon):
    """dtype as a list or map hit `x in DTYPES` (unhashable): 558 `internal`s in 100k."""
    x = np.zeros((1, *SHAPE), np.float32)
    header = {"v": 1, "op": "push", "sensor": "s", "seq": 1, "shape": [1, *SHAPE],
              "labels": [0], "rid": 9}
    for dtype in (["float32"], {"a": 1}, {}, [], b"float32", 1.5, 2**64 - 1, None, True):
        reply = _raw(fuzz_daemon.address, pack({**header, "dtype": dtype}), x.tobytes())
        assert reply["error"] == ErrorCode.BAD_DTYPE, (dtype, reply)
        assert reply["rid"] == 9 and reply["seq"] == 1
    assert get_status(fuzz_daemon.address)["refused"][ErrorCode.INTERNAL] == 0


def test_a_chunk_at_any_offset_is_answered_not_internal(fuzz_daemon):
    """offset >= 2^62 of a published file reached the seek: `internal`. Past the end is an
    empty chunk with eof; above 2^63 - 1 (outside the 64-bit offset) is bad_request."""
    chunk = {"v": 1, "op": "snapshot.chunk", "version": 1, "file": "model.onnx", "size": 8}
    for offset in (0, 30, 32, 2**40, 2**62, 2**63 - 1):
        reply = _raw(fuzz_daemon.address, pack({**chunk, "offset": offset}))
        assert reply["ok"], reply
        assert reply["data"] == (b"onnx" * 8)[offset:offset + 8] and reply["total"] == 32
        assert reply["eof"] == (offset + 8 >= 32)
    for offset in (2**63, 2**64 - 1, -1, -2**63):
        reply = _raw(fuzz_daemon.address, pack({**chunk, "offset": offset}))
        assert reply["error"] == ErrorCode.BAD_REQUEST and "offset" in reply["message"]
    assert get_status(fuzz_daemon.address)["refused"][ErrorCode.INTERNAL] == 0


def test_a_payload_frame_on_any_op_but_push_is_bad_request(fuzz_daemon):
    """status and ping with a payload frame were answered ok."""
    for op in ("ping", "status", "snapshot.info", "snapshot.export", "snapshot.rollback"):
        for extra in ([b"x"], [b""], [b"x", b"y"]):
            reply = _raw(fuzz_daemon.address, pack({"v": 1, "op": op, "rid": op}), *extra)
            assert reply["error"] == ErrorCode.BAD_REQUEST, (op, reply)
            assert reply["rid"] == op and "frame" in reply["message"]
    assert fuzz_daemon.snapshots.store.versions() == [1], "a rollback with a payload frame ran"


@pytest.mark.parametrize("frames, code", [
    ([_ping(v=2, rid="r")], ErrorCode.BAD_VERSION),
    ([pack({"op": "ping", "rid": "r"})], ErrorCode.BAD_VERSION),
    ([pack({"v": 1, "rid": "r"})], ErrorCode.BAD_REQUEST),
    ([_ping(op=["ping"], rid="r")], ErrorCode.BAD_REQUEST),
    ([_ping(op=7, rid="r")], ErrorCode.BAD_REQUEST),
    ([_ping(rid="r"), b"payload"], ErrorCode.BAD_REQUEST),
    ([_ping(rid="r"), b"a", b"b"], ErrorCode.BAD_REQUEST),
    ([pack({"v": 1, "op": "push", "rid": "r"})], ErrorCode.BAD_REQUEST),
    ([_ping(op="nope", rid="r")], ErrorCode.UNKNOWN_OP),
    ([pack({"v": 1, "op": "snapshot.chunk", "rid": "r", "version": [1]})],
     ErrorCode.BAD_REQUEST),
])
def test_every_error_reply_echoes_the_rid(fuzz_daemon, frames, code):
    """bad_version and the envelope's bad_requests came back without the request's rid."""
    reply = _raw(fuzz_daemon.address, *frames)
    assert reply["error"] == code and reply["rid"] == "r", reply


def test_an_invalid_rid_is_bad_request_and_not_echoed(fuzz_daemon):
    for rid in ([1], {"a": 1}, "r" * 257, b"b" * 257):
        reply = _raw(fuzz_daemon.address, _ping(rid=rid))
        assert reply["error"] == ErrorCode.BAD_REQUEST and "rid" not in reply
        assert "'rid'" in reply["message"]
    for rid in (0, -2**63, 2**64 - 1, 1.5, True, "r" * 256, b"b" * 256):
        assert _raw(fuzz_daemon.address, _ping(rid=rid))["rid"] == rid
