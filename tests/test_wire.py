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


# Every documented header field and the code a wrong one earns (docs/protocol.md), written
# out here rather than read from wire.OP_FIELDS, so the table checks the code.
DOCUMENTED_FIELDS = {
    "push": {"sensor": ErrorCode.BAD_REQUEST, "seq": ErrorCode.BAD_REQUEST,
             "shape": ErrorCode.BAD_SHAPE, "dtype": ErrorCode.BAD_DTYPE,
             "labels": ErrorCode.BAD_LABEL},
    "snapshot.info": {"since": ErrorCode.BAD_REQUEST, "wait_ms": ErrorCode.BAD_REQUEST},
    "snapshot.chunk": {"version": ErrorCode.BAD_REQUEST, "file": ErrorCode.BAD_REQUEST,
                       "offset": ErrorCode.BAD_REQUEST, "size": ErrorCode.BAD_REQUEST},
    "snapshot.rollback": {"to": ErrorCode.BAD_REQUEST},
    "model.get": {"wait_ms": ErrorCode.BAD_REQUEST},
    "model.merge": {"labels": ErrorCode.BAD_LABEL, "arrays": ErrorCode.BAD_REQUEST,
                    "counts": ErrorCode.BAD_REQUEST, "merge_id": ErrorCode.BAD_REQUEST,
                    "wait_ms": ErrorCode.BAD_REQUEST},
}
GOOD = {"push": {"sensor": "s", "seq": 1, "shape": [1, 1, 2, 2], "dtype": "uint8",
                 "labels": [0]},
        "snapshot.info": {"since": 0, "wait_ms": 0},
        "snapshot.chunk": {"version": 1, "file": "model.onnx", "offset": 0, "size": 1},
        "snapshot.rollback": {"to": 1},
        "model.get": {"wait_ms": 0},
        "model.merge": {"labels": [0], "arrays": [{"name": "w", "dtype": "float32",
                                                   "shape": [1]}],
                        "counts": [1], "merge_id": "r1", "wait_ms": 0}}
WRONG_TYPES = [[1], [], {"a": 1}, {}, b"xy", 1.5, float("nan"), True, [[1]], {1: [2]}]


@pytest.mark.parametrize("op, name", [(op, name) for op, fields in DOCUMENTED_FIELDS.items()
                                      for name in fields])
@pytest.mark.parametrize("value", WRONG_TYPES, ids=repr)
def test_every_field_refuses_every_wrong_type_with_its_code(op, name, value):
    from edgecl.wire import OP_FIELDS, check_header
    assert set(OP_FIELDS[op]) == set(DOCUMENTED_FIELDS[op]), "a field is undocumented"
    header = {"v": PROTOCOL_VERSION, "op": op, **GOOD[op]}
    assert check_header(header) == header  # the good header passes
    if name in ("labels", "arrays", "counts") and isinstance(value, list) and (
            value or (op, name) == ("push", "labels")):
        return  # the right type; the items are checked by decode_push / the merge checks
    assert _code(lambda: check_header({**header, name: value})) == DOCUMENTED_FIELDS[op][name]


@pytest.mark.parametrize("op, name, value", [
    ("push", "seq", 2**63), ("push", "seq", 2**64 - 1), ("push", "sensor", "s" * 129),
    ("push", "shape", [1, 1, 2]), ("snapshot.chunk", "offset", 2**63),
    ("snapshot.chunk", "offset", -1), ("snapshot.chunk", "size", 0),
    ("snapshot.chunk", "version", -1), ("snapshot.info", "wait_ms", -1),
    ("snapshot.info", "since", 2**64 - 1), ("snapshot.rollback", "to", -5),
])
def test_integers_and_lengths_are_range_checked(op, name, value):
    from edgecl.wire import check_header
    header = {"v": PROTOCOL_VERSION, "op": op, **GOOD[op], name: value}
    assert _code(lambda: check_header(header)) == DOCUMENTED_FIELDS[op][name]


def test_nil_optional_fields_are_absent_and_required_ones_are_not():
    from edgecl.wire import check_header
    header = check_header({"v": 1, "op": "snapshot.chunk", "version": 1, "file": "meta.json",
                           "offset": None, "size": None, "rid": None})
    assert "offset" not in header and "size" not in header
    assert _code(lambda: check_header({"v": 1, "op": "snapshot.chunk", "version": None,
                                       "file": "meta.json"})) == ErrorCode.BAD_REQUEST


@settings(max_examples=300, deadline=None)
@given(value=st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1),
                                    st.floats(), st.text(max_size=5), st.binary(max_size=5)),
                          lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                  st.dictionaries(st.text(max_size=3), inner,
                                                                  max_size=3)),
                          max_leaves=8),
       op=st.sampled_from(sorted(DOCUMENTED_FIELDS)), data=st.data())
def test_any_value_in_any_field_is_accepted_or_refused_with_a_code(value, op, data):
    """Type confusion everywhere: never anything but a WireError from the header checks."""
    from edgecl.wire import check_header
    name = data.draw(st.sampled_from(sorted(DOCUMENTED_FIELDS[op])))
    header = {"v": PROTOCOL_VERSION, "op": op, **GOOD[op], name: value}
    try:
        check_header(header)
        if op == "push":
            decode_push(header, b"\x00" * 4, spec=None, **LIMITS)
    except WireError as exc:
        assert exc.code in ErrorCode.ALL and len(exc.message) < 300
