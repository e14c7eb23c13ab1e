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
from edgecl.wire import ErrorCode
from fuzz_messages import SHAPE, FuzzRun, fuzz_config, malformed

N_MESSAGES = 2000


def finite_model(learner) -> bool:
    return all(torch.isfinite(t).all() for t in learner.student.state_dict().values()
               if t.is_floating_point())


def test_malformed_requests_all_get_their_code_and_valid_traffic_still_learns(tmp_path,
                                                                             run_daemons):
    daemon = run_daemons(fuzz_config(str(tmp_path / "state")))
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
                              ErrorCode.TOO_MANY_CLASSES}

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
