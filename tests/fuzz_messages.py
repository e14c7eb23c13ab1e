"""Malformed requests, as hypothesis strategies, and a runner that fires them at a daemon.

Shared by tests/test_fuzz.py (2,000+ messages) and benchmarks/fuzz.py (a longer run). Every
strategy draws `(frames, expected)`: the frames after the routing envelope, and the error code
the daemon must answer with, or None where only "some error code" can be promised (random
bytes). Each push carries exactly one flaw, so its code is fixed by docs/protocol.md.

The target daemon is configured by `fuzz_config()`: input fixed at 1x8x8 float32 (so NaN and
Inf reach the value check), small limits so every limit is cheap to cross.
"""
from __future__ import annotations

import struct
import time
from collections import Counter
from dataclasses import dataclass, field

import msgpack
import numpy as np
import zmq
from hypothesis import strategies as st

from edgecl.config import Config
from edgecl.wire import PROTOCOL_VERSION, ErrorCode, check_msgpack_bounds

SHAPE = (1, 8, 8)
MAX_BATCH = 8
MAX_CLASSES = 4
MAX_LABEL_CHARS = 16
MAX_HEADER_BYTES = 4096
MAX_HEADER_DEPTH = 4
SERVED_OPS = ("push", "ping", "status", "snapshot.info", "snapshot.chunk", "snapshot.export",
              "snapshot.rollback")


def fuzz_config(state_dir: str) -> Config:
    config = Config()
    config.serve.port = 0
    config.serve.bind = "127.0.0.1"
    config.serve.state_dir = state_dir
    config.serve.stats_interval_s = 0.05
    config.serve.max_batch = MAX_BATCH
    config.serve.max_classes = MAX_CLASSES
    config.serve.max_label_chars = MAX_LABEL_CHARS
    config.serve.max_header_bytes = MAX_HEADER_BYTES
    config.serve.max_header_depth = MAX_HEADER_DEPTH
    config.input.channels, config.input.height, config.input.width = SHAPE
    config.input.dtype = "float32"
    config.snapshots.every_samples = 0  # snapshot ops are served; nothing is exported
    config.learner = {"buffer_size": 10, "method": "finetune", "threads": 1, "seed": 0}
    return config


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# ------------------------------------------------------------------------------ strategies

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1),
                    st.floats(allow_nan=True), st.text(max_size=8), st.binary(max_size=8))
# Edges of msgpack's int range and of the 64-bit fields (seq, offsets, versions).
edge_ints = st.sampled_from([-2**63, -2**62, -1, 0, 1, 2**31, 2**62, 2**63 - 1, 2**63,
                             2**64 - 1])
# Type confusion: what a client can put where any one value belongs.
confusion = st.one_of(
    scalars, edge_ints,
    st.lists(st.one_of(scalars, edge_ints), max_size=4),
    st.dictionaries(st.text(max_size=4), scalars, max_size=3),
    st.dictionaries(st.integers(-9, 9), scalars, max_size=2),
    st.lists(st.lists(scalars, max_size=2), max_size=2))


@st.composite
def valid_push(draw):
    """A push the daemon would accept: header dict, float32 samples, labels."""
    n = draw(st.integers(1, MAX_BATCH))
    x = draw(st.integers(0, 2**32 - 1).map(
        lambda s: np.random.default_rng(s).random((n, *SHAPE), dtype=np.float32)))
    labels = draw(st.lists(st.sampled_from([0, 1, "a", "b"]), min_size=n, max_size=n))
    header = {"v": PROTOCOL_VERSION, "op": "push", "sensor": "fuzz",
              "seq": draw(st.integers(0, 2**62)), "shape": [n, *SHAPE], "dtype": "float32",
              "labels": labels}
    return {**header, **draw(junk_fields)}, x, labels


# Unknown fields are ignored (docs/protocol.md): every message may carry some, of any type.
junk_fields = st.dictionaries(st.sampled_from(["x", "pad", "extra", "_", "rid2"]), confusion,
                              max_size=2)


def _with(header: dict, **changes) -> dict:
    out = {**header, **changes}
    return {k: v for k, v in out.items() if v is not _DROP}


_DROP = object()


@st.composite
def flawed_push(draw):
    """A valid push with exactly one flaw; returns (frames, the code it must get)."""
    header, x, labels = draw(valid_push())
    n = len(labels)
    payload = x.tobytes()
    flaw = draw(st.sampled_from(sorted(FLAWS)))
    return FLAWS[flaw](draw, header, x, payload, n)


def _bad_shape_list(draw, header, x, payload, n):
    shape = draw(st.one_of(
        st.lists(st.integers(1, 8), max_size=6).filter(lambda s: len(s) != 4),
        st.tuples(st.just(n), st.integers(-3, 0), st.just(8), st.just(8)).map(list),
        st.lists(confusion, min_size=4, max_size=4).filter(
            lambda s: not all(type(d) is int and 0 < d < 2**31 for d in s)),
        st.tuples(st.just(n), st.just(1), st.sampled_from([2**31, 2**62, 2**64 - 1]),
                  st.just(8)).map(list),
        confusion.filter(lambda s: type(s) is not list or len(s) != 4)))
    return [pack(_with(header, shape=shape)), payload], ErrorCode.BAD_SHAPE


def _spec_mismatch(draw, header, x, payload, n):
    c, h, w = draw(st.sampled_from([(1, 4, 16), (4, 4, 4), (2, 8, 4), (1, 2, 32)]))
    return [pack(_with(header, shape=[n, c, h, w])), payload], ErrorCode.BAD_SHAPE


def _payload_size(draw, header, x, payload, n):
    delta = draw(st.integers(-len(payload), 64).filter(lambda d: d != 0))
    cut = payload[:len(payload) + delta] if delta < 0 else payload + b"\x00" * delta
    return [pack(header), cut], ErrorCode.BAD_SHAPE


def _bad_dtype(draw, header, x, payload, n):
    dtype = draw(st.one_of(st.sampled_from(["int16", "float64", "uint8 ", "", "FLOAT32"]),
                           confusion).filter(lambda d: d not in ("float32", "uint8")
                                             if type(d) is str else True))
    return [pack(_with(header, dtype=dtype)), payload], ErrorCode.BAD_DTYPE


def _spec_dtype(draw, header, x, payload, n):
    as_bytes = (x * 255).astype(np.uint8).tobytes()  # right size for uint8: spec says float32
    return [pack(_with(header, dtype="uint8")), as_bytes], ErrorCode.BAD_DTYPE


def _bad_value(draw, header, x, payload, n):
    bad = draw(st.sampled_from([np.nan, np.inf, -np.inf, -0.5, 1.5, 1e30]))
    y = x.copy().reshape(-1)
    y[draw(st.integers(0, y.size - 1))] = bad
    return [pack(header), y.tobytes()], ErrorCode.BAD_VALUE


def _bad_labels(draw, header, x, payload, n):
    bad = draw(st.one_of(st.just(""),
                         st.text(min_size=MAX_LABEL_CHARS + 1, max_size=MAX_LABEL_CHARS + 8),
                         confusion.filter(lambda v: type(v) not in (int, str))))
    labels = list(header["labels"])
    labels[draw(st.integers(0, n - 1))] = bad
    return [pack(_with(header, labels=labels)), payload], ErrorCode.BAD_LABEL


def _label_count(draw, header, x, payload, n):
    labels = draw(st.one_of(st.lists(st.just(0), max_size=MAX_BATCH + 2).filter(
        lambda ls: len(ls) != n), confusion.filter(lambda v: type(v) is not list
                                                   or len(v) != n)))
    return [pack(_with(header, labels=labels)), payload], ErrorCode.BAD_LABEL


def _too_many_classes(draw, header, x, payload, n):
    n = MAX_BATCH
    labels = [f"class{i}" for i in range(n)]  # more distinct labels than MAX_CLASSES
    x = np.zeros((n, *SHAPE), np.float32)
    return ([pack(_with(header, shape=[n, *SHAPE], labels=labels)), x.tobytes()],
            ErrorCode.TOO_MANY_CLASSES)


def _too_many_samples(draw, header, x, payload, n):
    n = draw(st.integers(MAX_BATCH + 1, 4 * MAX_BATCH))
    x = np.zeros((n, *SHAPE), np.float32)
    return ([pack(_with(header, shape=[n, *SHAPE], labels=[0] * n)), x.tobytes()],
            ErrorCode.TOO_LARGE)


def _huge_header(draw, header, x, payload, n):
    pad = "x" * draw(st.integers(MAX_HEADER_BYTES, 2 * MAX_HEADER_BYTES))
    return [pack(_with(header, pad=pad)), payload], ErrorCode.TOO_LARGE


def _deep_header(draw, header, x, payload, n):
    depth = draw(st.integers(MAX_HEADER_DEPTH, 64))
    nested = 0
    for _ in range(depth):
        nested = [nested]
    return [pack(_with(header, pad=nested)), payload], ErrorCode.BAD_REQUEST


def _truncated(draw, header, x, payload, n):
    return [pack(header)], ErrorCode.BAD_REQUEST


def _extra_frames(draw, header, x, payload, n):
    extra = draw(st.lists(st.binary(max_size=16), min_size=1, max_size=3))
    return [pack(header), payload, *extra], ErrorCode.BAD_REQUEST


def _bad_sensor_or_seq(draw, header, x, payload, n):
    key = draw(st.sampled_from(["sensor", "seq"]))
    value = draw(st.one_of(st.just(_DROP), st.just(""), st.text(min_size=129, max_size=140),
                           confusion.filter(lambda v: type(v) is not str))
                 if key == "sensor" else
                 st.one_of(st.just(_DROP), st.sampled_from([2**63, 2**64 - 1]),
                           confusion.filter(lambda v: type(v) is not int
                                            or not -2**63 <= v < 2**63)))
    return [pack(_with(header, **{key: value})), payload], ErrorCode.BAD_REQUEST


def _bomb_in_labels(draw, header, x, payload, n):
    """The labels field declares millions of items in a few bytes."""
    head = pack(_with(header, labels=_DROP))
    count = draw(st.integers(2**16, 2**32 - 1))
    kind = draw(st.sampled_from([b"\xdd", b"\xdf", b"\xdb", b"\xc6"]))  # array/map/str/bin 32
    # a fixmap header's count is in its low nibble: add one key, "labels", to the map
    head = bytes([head[0] + 1]) + head[1:] + pack("labels") + kind + struct.pack(">I", count)
    return [head, payload], ErrorCode.BAD_REQUEST


FLAWS = {
    "shape": _bad_shape_list, "spec_shape": _spec_mismatch, "payload_size": _payload_size,
    "dtype": _bad_dtype, "spec_dtype": _spec_dtype, "value": _bad_value, "label": _bad_labels,
    "label_count": _label_count, "classes": _too_many_classes, "samples": _too_many_samples,
    "header_size": _huge_header, "header_depth": _deep_header, "truncated": _truncated,
    "extra_frames": _extra_frames, "sensor_seq": _bad_sensor_or_seq,
    "labels_bomb": _bomb_in_labels,
}


@st.composite
def msgpack_bomb(draw):
    """A few bytes that declare huge or deeply nested containers or strings."""
    kind = draw(st.sampled_from(["nested", "wide", "string"]))
    if kind == "nested":
        depth = draw(st.integers(2, 3000))
        one = draw(st.sampled_from([b"\x91", b"\xdc\xff\xff", b"\xdd\x00\x10\x00\x00",
                                    b"\x81\x00"]))
        body = one * depth
    elif kind == "wide":
        body = draw(st.sampled_from([b"\xdd", b"\xdf"])) + struct.pack(
            ">I", draw(st.integers(2**10, 2**32 - 1)))
    else:
        body = draw(st.sampled_from([b"\xdb", b"\xc6", b"\xc9"])) + struct.pack(
            ">I", draw(st.integers(2**10, 2**32 - 1)))
    # inside a plausible header, or bare
    if draw(st.booleans()):
        body = b"\x83" + pack("v") + pack(1) + pack("op") + pack("push") + pack("x") + body
    return [body], (ErrorCode.TOO_LARGE if len(body) > MAX_HEADER_BYTES
                    else ErrorCode.BAD_REQUEST)


def _valid_rid(rid) -> bool:
    return rid is None or (type(rid) in (bool, int, float) or
                           (type(rid) in (str, bytes) and len(rid) <= 256))


bad_rids = st.one_of(confusion.filter(lambda r: not _valid_rid(r)),
                     st.text(min_size=257, max_size=300), st.binary(min_size=257, max_size=300))
good_rids = st.one_of(scalars, edge_ints).filter(_valid_rid)


@st.composite
def bad_envelope(draw):
    """Not a versioned map with a string op and a scalar rid, or frames the op does not take."""
    which = draw(st.sampled_from(["not_map", "version", "op_type", "unknown_op", "rid",
                                  "frames"]))
    base = {"v": 1, "op": draw(st.sampled_from(SERVED_OPS[1:])), **draw(junk_fields)}
    if which == "not_map":
        value = draw(st.one_of(confusion.filter(lambda v: not isinstance(v, dict)),
                               st.lists(scalars, max_size=4)))
        return [pack(value)], ErrorCode.BAD_REQUEST
    if which == "version":
        v = draw(st.one_of(st.just(_DROP), st.sampled_from([0, 2, -1, "1", 1.0, True]),
                           confusion).filter(lambda v: v is _DROP or type(v) is not int
                                             or v != PROTOCOL_VERSION))
        return [pack(_with(base, v=v))], ErrorCode.BAD_VERSION
    if which == "op_type":
        op = draw(st.one_of(st.just(_DROP), confusion.filter(lambda o: not isinstance(o, str))))
        return [pack(_with(base, op=op))], ErrorCode.BAD_REQUEST
    if which == "rid":
        return [pack(_with(base, rid=draw(bad_rids)))], ErrorCode.BAD_REQUEST
    if which == "frames":  # a payload frame is for push only (status + payload was "ok")
        extra = draw(st.lists(st.binary(max_size=16), min_size=1, max_size=2))
        return [pack(base), *extra], ErrorCode.BAD_REQUEST
    op = draw(st.text(max_size=20).filter(lambda o: o not in SERVED_OPS))
    return [pack({"v": 1, "op": op})], ErrorCode.UNKNOWN_OP


# The fields of each snapshot op, from docs/protocol.md: (required, accepts(value)).
def _int_from(low: int):
    return lambda v: type(v) is int and low <= v < 2**63


SNAPSHOT_FIELDS = {
    "snapshot.info": {"since": (False, _int_from(0)), "wait_ms": (False, _int_from(0)),
                      "precision": (False, lambda v: type(v) is str and
                                    v in ("any", "fp32", "int8"))},
    "snapshot.chunk": {"version": (True, _int_from(0)),
                       "file": (True, lambda v: v in ("model.onnx", "model.int8.onnx",
                                                      "meta.json") if type(v) is str
                                else False),
                       "offset": (False, _int_from(0)), "size": (False, _int_from(1))},
    "snapshot.rollback": {"to": (False, _int_from(0))},
}
CHUNK_OK = {"version": 1, "file": "model.onnx", "offset": 0, "size": 16}


@st.composite
def bad_snapshot_request(draw):
    """One field of a snapshot op of the wrong type or out of range; the rest valid."""
    op = draw(st.sampled_from(sorted(SNAPSHOT_FIELDS)))
    name = draw(st.sampled_from(sorted(SNAPSHOT_FIELDS[op])))
    required, accepts = SNAPSHOT_FIELDS[op][name]
    value = draw(st.one_of(confusion, edge_ints, st.text(max_size=12)).filter(
        lambda v: not accepts(v) and (required or v is not None)))
    fields = dict(CHUNK_OK) if op == "snapshot.chunk" else {}
    fields[name] = value
    return [pack({"v": 1, "op": op, **fields, **draw(junk_fields)})], ErrorCode.BAD_REQUEST


@st.composite
def chunk_past_the_end(draw):
    """A valid chunk request of published version 1 (see publish_fake_snapshot) at any
    offset up to 2^63 - 1: answered with the bytes there, or none past the end."""
    offset = draw(st.one_of(st.integers(0, 64), edge_ints.filter(lambda v: 0 <= v < 2**63),
                            st.integers(0, 2**63 - 1)))
    fields = {**CHUNK_OK, "offset": offset, "file": draw(st.sampled_from(
        ["model.onnx", "model.int8.onnx"]))}
    return [pack({"v": 1, "op": "snapshot.chunk", **fields})], OK


OK = "ok"  # the expectation for a request that must be answered ok: true


def publish_fake_snapshot(daemon) -> None:
    """Version 1 of a few bytes, so chunk requests reach the file reads (no export needed)."""
    daemon.snapshots.store.publish({"model.onnx": b"onnx" * 8, "model.int8.onnx": b"int8" * 8},
                                   {"labels": [], "fake": True})


def _is_valid_request(frames: list[bytes]) -> bool:
    try:
        header = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)
    except Exception:
        return False
    return (isinstance(header, dict) and type(header.get("v")) is int and header["v"] == 1
            and header.get("op") in SERVED_OPS)


@st.composite
def garbage(draw):
    """Random frames: whatever they are, the daemon must answer with an error code."""
    frames = draw(st.lists(st.binary(max_size=64), min_size=1, max_size=3))
    if any(_is_valid_request([frame]) for frame in frames):
        frames = [b"\xc1" + frame for frame in frames]  # 0xc1 is never valid msgpack
    return frames, None


@st.composite
def with_rid(draw, messages):
    """Give a message whose header decodes to a map a random valid `rid` half of the time:
    every reply must echo it, whatever the error."""
    frames, expected = draw(messages)
    header = _decoded(frames[0])
    if isinstance(header, dict) and "rid" not in header and draw(st.booleans()):
        frames = [pack({**header, "rid": draw(good_rids)}), *frames[1:]]
    return frames, expected


malformed = with_rid(st.one_of(flawed_push(), msgpack_bomb(), bad_envelope(),
                               bad_snapshot_request(), chunk_past_the_end(), garbage()))


def _decoded(frame: bytes):
    """The frame as msgpack, or None; bombs are never handed to msgpack."""
    if len(frame) > MAX_HEADER_BYTES:
        return None
    try:
        check_msgpack_bounds(frame, MAX_HEADER_DEPTH)
        return msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception:
        return None


# ------------------------------------------------------------------------------ the runner

@dataclass
class FuzzRun:
    """One DEALER that sends each malformed message and checks its single reply."""

    address: str
    timeout_ms: int = 5000
    codes: Counter = field(default_factory=Counter)
    sent: int = 0
    mismatches: list = field(default_factory=list)
    unanswered: int = 0
    extra_replies: int = 0
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self):
        self._sock = zmq.Context.instance().socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self.address)

    def send(self, frames: list[bytes], expected: str | None) -> dict:
        """Send one message; exactly one reply must come, refusing it with `expected` (any
        code if None; ok if OK), echoing its valid rid. Wrong answers are collected in
        `mismatches`; a missing, second or uncoded reply raises."""
        self._sock.send_multipart(frames)
        self.sent += 1
        if not self._sock.poll(self.timeout_ms):
            self.unanswered += 1
            raise AssertionError(f"no reply within {self.timeout_ms} ms to {frames!r:.200}")
        reply = msgpack.unpackb(self._sock.recv_multipart()[-1], raw=False,
                                strict_map_key=False)
        if self._sock.poll(0):
            self.extra_replies += 1
            raise AssertionError(f"more than one reply to {frames!r:.200}")
        code = OK if reply.get("ok") is True else reply.get("error")
        if code != OK and (reply.get("ok") is not False or code not in ErrorCode.ALL):
            raise AssertionError(f"uncoded reply {reply!r:.200} to {frames!r:.200}")
        if code == ErrorCode.INTERNAL or (expected is not None and code != expected):
            self.mismatches.append(f"expected {expected}, got {code} ({reply.get('message')}) "
                                   f"for {frames!r:.120}")
        header = _decoded(frames[0])
        rid = header.get("rid") if isinstance(header, dict) else None
        if rid is not None and _valid_rid(rid) and pack(reply.get("rid")) != pack(rid):
            self.mismatches.append(f"rid {rid!r:.40} not echoed ({code}) for {frames!r:.120}")
        self.codes[code] += 1
        return reply

    def close(self) -> None:
        self._sock.close(linger=0)
