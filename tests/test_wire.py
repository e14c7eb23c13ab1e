"""The protocol's header checks, without sockets: what is accepted, what is refused and why."""
from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgecl.wire import (PROTOCOL_VERSION, ErrorCode, InputSpec, WireError, decode_push, pack,
                         push_header, unpack_header)

LIMITS = dict(max_samples=256, max_bytes=1 << 20)


def _push(x: np.ndarray, labels, spec=None, **limits):
    header = unpack_header(pack(push_header("s1", 7, x, labels)))
    return decode_push(header, x.tobytes(), spec=spec, **{**LIMITS, **limits})


def _code(fn) -> str:
    with pytest.raises(WireError) as info:
        fn()
    return info.value.code


labels_strategy = st.lists(
    st.one_of(st.integers(-2**63, 2**63 - 1), st.text(min_size=1, max_size=20)),
    min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(labels=labels_strategy, c=st.integers(1, 3), h=st.integers(1, 9),
       w=st.integers(1, 9), dtype=st.sampled_from(["uint8", "float32"]))
def test_push_round_trips_shape_dtype_and_label_types(labels, c, h, w, dtype):
    rng = np.random.default_rng(0)
    shape = (len(labels), c, h, w)
    x = (rng.integers(0, 256, shape).astype(np.uint8) if dtype == "uint8"
         else rng.random(shape, dtype=np.float32))
    request = _push(x, labels)
    assert request.x.dtype == x.dtype and request.x.shape == shape
    np.testing.assert_array_equal(request.x, x)
    assert request.labels == labels
    assert [type(a) for a in request.labels] == [type(b) for b in labels]
    assert (request.sensor, request.seq) == ("s1", 7)


def test_int_and_string_labels_stay_distinct():
    x = np.zeros((2, 1, 2, 2), np.uint8)
    assert _push(x, [1, "1"]).labels == [1, "1"]


def test_payload_is_not_copied():
    x = np.arange(2 * 1 * 4 * 4, dtype=np.uint8).reshape(2, 1, 4, 4)
    payload = bytearray(x.tobytes())
    header = unpack_header(pack(push_header("s", 1, x, [0, 1])))
    request = decode_push(header, payload, spec=None, **LIMITS)
    payload[0] = 99
    assert request.x[0, 0, 0, 0] == 99  # a view over the frame, not a copy


@pytest.mark.parametrize("frame, code", [
    (b"\xc1garbage", ErrorCode.BAD_REQUEST),
    (msgpack.packb([1, 2]), ErrorCode.BAD_REQUEST),
    (msgpack.packb({"op": "ping"}), ErrorCode.BAD_VERSION),
    (msgpack.packb({"v": PROTOCOL_VERSION + 1, "op": "ping"}), ErrorCode.BAD_VERSION),
    (msgpack.packb({"v": PROTOCOL_VERSION}), ErrorCode.BAD_REQUEST),
])
def test_bad_headers(frame, code):
    assert _code(lambda: unpack_header(frame)) == code


def test_bad_pushes_get_the_right_code():
    x = np.zeros((4, 1, 3, 3), np.uint8)
    good = push_header("s", 1, x, [0, 1, 2, 3])

    def decode(payload=x.tobytes(), spec=None, limits=LIMITS, **changes):
        return lambda: decode_push({**good, **changes}, payload, spec=spec, **limits)

    assert _code(decode(shape=[4, 9])) == ErrorCode.BAD_SHAPE
    assert _code(decode(shape=[4, 1, 3, 0])) == ErrorCode.BAD_SHAPE
    assert _code(decode(payload=x.tobytes()[:-1])) == ErrorCode.BAD_SHAPE
    assert _code(decode(spec=InputSpec(1, 4, 4, "uint8"))) == ErrorCode.BAD_SHAPE
    assert _code(decode(dtype="int16")) == ErrorCode.BAD_DTYPE
    assert _code(decode(spec=InputSpec(1, 3, 3, "float32"))) == ErrorCode.BAD_DTYPE
    assert _code(decode(labels=[0, 1, 2])) == ErrorCode.BAD_LABEL
    assert _code(decode(labels=[0, 1, 2, 3.5])) == ErrorCode.BAD_LABEL
    assert _code(decode(labels=[0, 1, 2, True])) == ErrorCode.BAD_LABEL
    assert _code(decode(labels=[0, 1, 2, ""])) == ErrorCode.BAD_LABEL
    assert _code(decode(labels=[0, 1, 2, None])) == ErrorCode.BAD_LABEL
    assert _code(decode(limits=dict(max_samples=3, max_bytes=1 << 20))) == ErrorCode.TOO_LARGE
    assert _code(decode(limits=dict(max_samples=9, max_bytes=10))) == ErrorCode.TOO_LARGE
    assert _code(decode(payload=None)) == ErrorCode.BAD_REQUEST
    assert _code(decode(seq="7")) == ErrorCode.BAD_REQUEST
    assert _code(decode(sensor="")) == ErrorCode.BAD_REQUEST
    # the unchanged header is fine, so each refusal above is due to its one change
    assert decode()().labels == [0, 1, 2, 3]


@pytest.mark.parametrize("value", [np.nan, np.inf, -0.01, 1.01])
def test_float_samples_outside_unit_range_are_bad_value(value):
    x = np.full((1, 1, 2, 2), 0.5, np.float32)
    x[0, 0, 1, 1] = value
    assert _code(lambda: _push(x, [0])) == ErrorCode.BAD_VALUE
