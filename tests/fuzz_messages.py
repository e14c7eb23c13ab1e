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
from edgecl.wire import PROTOCOL_VERSION, ErrorCode

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
    return header, x, labels


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
        st.lists(scalars, min_size=4, max_size=4).filter(
            lambda s: not all(type(d) is int and d > 0 for d in s)),
        scalars))
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
                           scalars).filter(lambda d: d not in ("float32", "uint8")))
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
    bad = draw(st.one_of(st.floats(), st.booleans(), st.none(), st.just(""),
                         st.text(min_size=MAX_LABEL_CHARS + 1, max_size=MAX_LABEL_CHARS + 8),
                         st.lists(st.integers(), max_size=2), st.binary(max_size=4)))
    labels = list(header["labels"])
    labels[draw(st.integers(0, n - 1))] = bad
    return [pack(_with(header, labels=labels)), payload], ErrorCode.BAD_LABEL


def _label_count(draw, header, x, payload, n):
    labels = draw(st.one_of(st.lists(st.just(0), max_size=MAX_BATCH + 2).filter(
        lambda ls: len(ls) != n), scalars))
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
                           st.booleans(), st.floats(), st.none(), st.binary(max_size=4))
                 if key == "sensor" else
                 st.one_of(st.just(_DROP), st.booleans(), st.floats(), st.text(max_size=4),
                           st.none(), st.lists(st.integers(), max_size=2)))
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


@st.composite
def bad_envelope(draw):
    """Not a versioned map with a string op."""
    which = draw(st.sampled_from(["not_map", "version", "op_type", "unknown_op"]))
    if which == "not_map":
        value = draw(st.one_of(scalars, st.lists(scalars, max_size=4)))
        return [pack(value)], ErrorCode.BAD_REQUEST
    if which == "version":
        v = draw(st.one_of(st.just(_DROP), st.sampled_from([0, 2, -1, "1", 1.0, True]), scalars)
                 .filter(lambda v: v is _DROP or type(v) is not int or v != PROTOCOL_VERSION))
        return [pack(_with({"v": 1, "op": "ping"}, v=v))], ErrorCode.BAD_VERSION
    if which == "op_type":
        op = draw(st.one_of(st.just(_DROP), scalars.filter(lambda o: not isinstance(o, str)),
                            st.lists(st.text(max_size=3), max_size=2)))
        return [pack(_with({"v": 1, "op": "ping"}, op=op))], ErrorCode.BAD_REQUEST
    op = draw(st.text(max_size=20).filter(lambda o: o not in SERVED_OPS))
    return [pack({"v": 1, "op": op})], ErrorCode.UNKNOWN_OP


@st.composite
def bad_snapshot_request(draw):
    op = draw(st.sampled_from(["snapshot.info", "snapshot.chunk", "snapshot.rollback"]))
    bad = scalars.filter(lambda v: type(v) is not int)
    if op == "snapshot.info":
        fields = draw(st.one_of(st.fixed_dictionaries({"since": bad}),
                                st.fixed_dictionaries({"since": st.integers(-9, -1)}),
                                st.fixed_dictionaries({"wait_ms": st.one_of(
                                    bad, st.integers(-9, -1))})))
        fields = {k: v for k, v in fields.items() if v is not None}
        if not fields:
            fields = {"since": -1}
    elif op == "snapshot.chunk":
        fields = {"version": 1, "file": "model.onnx", "offset": 0, "size": 16}
        key = draw(st.sampled_from(["version", "file", "offset", "size"]))
        fields[key] = draw(bad if key != "file" else
                           st.text(max_size=12).filter(lambda f: "onnx" not in f
                                                       and f != "meta.json"))
        if key in ("offset", "size") and draw(st.booleans()):
            fields[key] = -1
    else:
        fields = {"to": draw(bad.filter(lambda v: v is not None))}
    return [pack({"v": 1, "op": op, **fields})], ErrorCode.BAD_REQUEST


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


malformed = st.one_of(flawed_push(), msgpack_bomb(), bad_envelope(), bad_snapshot_request(),
                      garbage())


# ------------------------------------------------------------------------------ the runner

@dataclass
class FuzzRun:
    """One DEALER that sends each malformed message and checks its single reply."""

    address: str
    timeout_ms: int = 5000
    codes: Counter = field(default_factory=Counter)
    sent: int = 0
    mismatches: list = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self):
        self._sock = zmq.Context.instance().socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self.address)

    def send(self, frames: list[bytes], expected: str | None) -> dict:
        self._sock.send_multipart(frames)
        self.sent += 1
        if not self._sock.poll(self.timeout_ms):
            raise AssertionError(f"no reply within {self.timeout_ms} ms to {frames!r:.200}")
        reply = msgpack.unpackb(self._sock.recv_multipart()[-1], raw=False,
                                strict_map_key=False)
        if self._sock.poll(0):
            raise AssertionError(f"more than one reply to {frames!r:.200}")
        code = reply.get("error")
        if reply.get("ok") is not False or code not in ErrorCode.ALL:
            raise AssertionError(f"accepted or uncoded reply {reply!r:.200} to {frames!r:.200}")
        if code == ErrorCode.INTERNAL or (expected is not None and code != expected):
            self.mismatches.append(f"expected {expected}, got {code} ({reply.get('message')}) "
                                   f"for {frames!r:.120}")
        self.codes[code] += 1
        return reply

    def close(self) -> None:
        self._sock.close(linger=0)
