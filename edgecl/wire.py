"""The wire protocol: frames, header checks and error codes, shared by daemon and clients.

docs/protocol.md is the human contract; this module is its executable form. Nothing here
touches a socket or torch, so it is cheap to test and to reuse from any client.

A request is one or two ZeroMQ frames after the routing envelope:
    [header: msgpack map]                  ping, status
    [header: msgpack map, payload: bytes]  push (a C-contiguous array, little-endian),
                                           model.merge (float32 arrays, concatenated)
A reply is always one msgpack map frame.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

PROTOCOL_VERSION = 1

# dtype names on the wire -> numpy dtype. Explicit little-endian so a big-endian host decodes
# the same bytes the same way.
DTYPES = {"uint8": np.dtype("u1"), "float32": np.dtype("<f4")}

MAX_LABEL_CHARS = 256
MAX_SENSOR_CHARS = 128
MAX_DIM = 2**31 - 1  # largest N, C, H or W a shape may name
# Header limits when the caller gives none (the daemon passes its serve.max_header_* settings).
MAX_HEADER_BYTES = 2 * 2**20
MAX_HEADER_DEPTH = 8


class ErrorCode:
    """Every error code a reply can carry. `RETRYABLE` ones mean: send the same request later."""

    BAD_REQUEST = "bad_request"      # not a msgpack map, wrong frame count, missing/ill-typed field
    BAD_VERSION = "bad_version"      # header "v" missing or not PROTOCOL_VERSION
    UNKNOWN_OP = "unknown_op"        # "op" is not one the daemon serves
    FORBIDDEN = "forbidden"          # the client's CURVE key lacks the role this op needs
    BAD_SHAPE = "bad_shape"          # shape not [N, C, H, W], payload size mismatch, or spec mismatch
    BAD_DTYPE = "bad_dtype"          # dtype not in DTYPES, or not the daemon's input dtype
    BAD_VALUE = "bad_value"          # float32 sample outside [0, 1] or not finite
    BAD_LABEL = "bad_label"          # label count != N, or a label is not an int or a short string
    TOO_LARGE = "too_large"          # more samples or bytes in one push (or header) than allowed
    TOO_MANY_CLASSES = "too_many_classes"  # the push would take the daemon past max_classes
    BUSY = "busy"                    # queue full: nothing was accepted, retry after retry_after_ms
    SHUTTING_DOWN = "shutting_down"  # daemon is draining: nothing was accepted, try again later
    NOT_FOUND = "not_found"          # a snapshot version or file that is not (or no longer) there
    NO_MODEL = "no_model"            # model.get/merge before the daemon has a student (nothing learned)
    STORAGE = "storage"              # the journal could not be written (disk full, unwritable)
    INTERNAL = "internal"            # a fault in edgecl itself; the daemon logged a traceback

    ALL = (BAD_REQUEST, BAD_VERSION, UNKNOWN_OP, FORBIDDEN, BAD_SHAPE, BAD_DTYPE, BAD_VALUE, BAD_LABEL,
           TOO_LARGE, TOO_MANY_CLASSES, BUSY, SHUTTING_DOWN, NOT_FOUND, NO_MODEL, STORAGE, INTERNAL)
    RETRYABLE = (BUSY, SHUTTING_DOWN)


class WireError(Exception):
    """A request the daemon refuses: becomes an error reply, never a crash."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def pack(obj: dict) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack_header(frame: bytes, max_bytes: int = MAX_HEADER_BYTES,
                  max_depth: int = MAX_HEADER_DEPTH) -> dict:
    """Decode a request header and check its envelope (`rid`, `v`, `op`) and the fields of
    its op: `check_header(decode_header(frame))`."""
    return check_header(decode_header(frame, max_bytes, max_depth))


def decode_header(frame: bytes, max_bytes: int = MAX_HEADER_BYTES,
                  max_depth: int = MAX_HEADER_DEPTH) -> dict:
    """The header frame as a msgpack map; anything else is refused.

    Size, nesting and every declared length are checked on the raw bytes first (see
    check_msgpack_bounds), so a msgpack bomb is refused before msgpack allocates for it."""
    if len(frame) > max_bytes:
        raise WireError(ErrorCode.TOO_LARGE,
                        f"header of {len(frame)} bytes; this daemon takes at most {max_bytes}")
    try:
        check_msgpack_bounds(frame, max_depth)
        header = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise WireError(ErrorCode.BAD_REQUEST, f"header is not valid msgpack ({exc})") from None
    if not isinstance(header, dict):
        raise WireError(ErrorCode.BAD_REQUEST,
                        f"header must be a msgpack map, got {type(header).__name__}")
    return header


def check_header(header: dict) -> dict:
    """Check the envelope, in order `rid`, `v`, `op` (so a bad version still echoes a good
    rid), then the op's fields (OP_FIELDS); returns the header with nil optional fields
    dropped, which is all a handler may read."""
    check_field(header, "rid", RID_FIELD)
    version = header.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise WireError(ErrorCode.BAD_VERSION,
                        f"protocol version {show_value(version)} is not supported; this daemon "
                        f"speaks v={PROTOCOL_VERSION}")
    op = header.get("op")
    if type(op) is not str:
        raise WireError(ErrorCode.BAD_REQUEST, "header needs a string field 'op'")
    return check_fields(header, OP_FIELDS.get(op, {}))


# Bytes that follow a msgpack type byte before its value: (length-field size, fixed extra).
# Containers and variable-length types are handled in check_msgpack_bounds itself.
_FIXED_WIDTH = {0xc0: 0, 0xc2: 0, 0xc3: 0, 0xca: 4, 0xcb: 8, 0xcc: 1, 0xcd: 2, 0xce: 4,
                0xcf: 8, 0xd0: 1, 0xd1: 2, 0xd2: 4, 0xd3: 8,
                0xd4: 2, 0xd5: 3, 0xd6: 5, 0xd7: 9, 0xd8: 17}           # fixext: type + data
_LENGTH_PREFIXED = {0xc4: (1, 0), 0xc5: (2, 0), 0xc6: (4, 0),          # bin 8/16/32
                    0xc7: (1, 1), 0xc8: (2, 1), 0xc9: (4, 1),          # ext: length, type, data
                    0xd9: (1, 0), 0xda: (2, 0), 0xdb: (4, 0)}          # str 8/16/32
_CONTAINERS = {0xdc: (2, 1), 0xdd: (4, 1), 0xde: (2, 2), 0xdf: (4, 2)}  # array/map 16/32


def check_msgpack_bounds(data: bytes, max_depth: int) -> None:
    """Walk msgpack bytes without building anything; ValueError unless they hold exactly one
    object, nested at most `max_depth` maps/arrays deep, whose every declared length fits in
    the bytes that follow it.

    msgpack preallocates a list for an array's declared length before reading its items, so
    a few bytes declaring millions of items, nested a thousand deep, can cost gigabytes. After
    this check every item is backed by at least one byte of the frame: what unpackb allocates
    is bounded by the frame's size."""
    end = len(data)
    pos = 0
    pending = [1]  # items still to read at each open level; the bottom one is the root
    while pending:
        if pending[-1] == 0:
            pending.pop()
            continue
        if pos >= end:
            raise ValueError("truncated: the data ends inside an object")
        pending[-1] -= 1
        kind = data[pos]
        pos += 1
        if kind <= 0x7f or kind >= 0xe0:          # positive / negative fixint
            continue
        if 0xa0 <= kind <= 0xbf:                  # fixstr
            pos += kind & 0x1f
        elif kind <= 0x9f:                        # fixmap 0x80-0x8f, fixarray 0x90-0x9f
            count = (kind & 0x0f) * (2 if kind <= 0x8f else 1)
            pos = _open(pending, count, pos, end, max_depth)
            continue
        elif kind in _FIXED_WIDTH:
            pos += _FIXED_WIDTH[kind]
        elif kind in _LENGTH_PREFIXED:
            width, extra = _LENGTH_PREFIXED[kind]
            pos += width + extra + _read_length(data, pos, width)
        elif kind in _CONTAINERS:
            width, per_item = _CONTAINERS[kind]
            pos = _open(pending, _read_length(data, pos, width) * per_item, pos + width, end,
                        max_depth)
            continue
        else:                                     # 0xc1: never used
            raise ValueError(f"byte 0x{kind:02x} at offset {pos - 1} is not msgpack")
        if pos > end:
            raise ValueError("truncated: a value runs past the end of the data")
    if pos != end:
        raise ValueError(f"{end - pos} bytes of extra data after the header map")


def _read_length(data: bytes, pos: int, width: int) -> int:
    if pos + width > len(data):
        raise ValueError("truncated: the data ends inside a length field")
    return int.from_bytes(data[pos:pos + width], "big")


def _open(pending: list, count: int, pos: int, end: int, max_depth: int) -> int:
    if count > end - pos:
        raise ValueError(f"a map or array declares {count} items but only {end - pos} bytes "
                         "follow")
    if len(pending) > max_depth:
        raise ValueError(f"maps and arrays nest deeper than {max_depth} levels")
    pending.append(count)
    return pos


# ------------------------------------------------------------------------------ typed fields

INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
MAX_RID_CHARS = 256
MAX_MERGE_ID_CHARS = 128
MAX_STATS_RANK = 64       # principal directions per class a model.stats may ask for
DEFAULT_STATS_RANK = 16   # ... and without `rank`
_SCALAR_TYPES = (bool, int, float, str, bytes)


@dataclass(frozen=True)
class Field:
    """One header field: its msgpack type, whether it must be there, its bounds (an int's
    value, a str's or list's length), and the code a wrong value earns.

    Types are exact: a bool is not an int and a float is not an int. A nil optional field
    counts as absent. "scalar" is any of nil, bool, int, float, str, bin."""

    kind: type | str
    required: bool = False
    low: int | None = None
    high: int | None = None
    code: str = ErrorCode.BAD_REQUEST
    what: str = ""


RID_FIELD = Field("scalar", high=MAX_RID_CHARS,
                  what=f"a scalar (str and bin up to {MAX_RID_CHARS} bytes)")
VERSION_FIELD = Field(int, low=0, high=INT64_MAX, what="a version number >= 0")
WAIT_FIELD = Field(int, low=0, high=INT64_MAX, what="milliseconds >= 0")

# The fields of every documented op (docs/protocol.md). Unknown fields are ignored.
OP_FIELDS: dict[str, dict[str, Field]] = {
    "push": {
        "sensor": Field(str, True, 1, MAX_SENSOR_CHARS,
                        what=f"a sensor name of 1..{MAX_SENSOR_CHARS} chars"),
        "seq": Field(int, True, INT64_MIN, INT64_MAX,
                     what="a 64-bit signed integer, unique per sensor"),
        "shape": Field(list, True, 4, 4, ErrorCode.BAD_SHAPE, "[N, C, H, W]"),
        "dtype": Field(str, True, 1, 16, ErrorCode.BAD_DTYPE, "a dtype name string"),
        "labels": Field(list, True, 0, INT64_MAX, ErrorCode.BAD_LABEL,
                        "an array with one label per sample"),
    },
    "ping": {},
    "status": {},
    "snapshot.info": {"since": VERSION_FIELD, "wait_ms": WAIT_FIELD},
    "snapshot.chunk": {
        "version": Field(int, True, 0, INT64_MAX, what="a version number >= 0"),
        "file": Field(str, True, 1, 64, what="a file name"),
        "offset": Field(int, low=0, high=INT64_MAX, what="a byte offset >= 0"),
        "size": Field(int, low=1, high=INT64_MAX, what="a byte count > 0"),
    },
    "snapshot.export": {"wait_ms": WAIT_FIELD},
    "snapshot.rollback": {"to": VERSION_FIELD},
    "model.get": {"wait_ms": WAIT_FIELD},
    "model.merge": {
        "labels": Field(list, True, 1, INT64_MAX, ErrorCode.BAD_LABEL,
                        "an array of the global model's labels, in its head order"),
        "arrays": Field(list, True, 1, INT64_MAX,
                        what="an array of {name, dtype, shape} maps, one per array"),
        "counts": Field(list, low=1, high=INT64_MAX, what="an array of ints, one per label"),
        "merge_id": Field(str, low=1, high=MAX_MERGE_ID_CHARS,
                          what=f"a str of 1..{MAX_MERGE_ID_CHARS} chars"),
        "wait_ms": WAIT_FIELD,
    },
    "model.stats": {
        "labels": Field(list, True, 1, INT64_MAX, ErrorCode.BAD_LABEL,
                        "an array of the global model's labels, in its head order"),
        "arrays": Field(list, True, 1, INT64_MAX,
                        what="an array of {name, dtype, shape} maps, one per array"),
        "rank": Field(int, low=0, high=MAX_STATS_RANK, what=f"an int in 0..{MAX_STATS_RANK}"),
        "wait_ms": WAIT_FIELD,
    },
}
# Ops whose request carries a payload frame: push (the samples), model.merge and
# model.stats (the weights).
PAYLOAD_OPS = {"push": "the samples", "model.merge": "the arrays' float32 bytes",
               "model.stats": "the arrays' float32 bytes"}


def check_field(header: dict, name: str, field: Field) -> Any:
    """The value of `name`, or None if it is absent (or nil, when optional); WireError with
    `field.code` if it has the wrong type or lies outside the field's bounds."""
    value = header.get(name)
    if value is None and not field.required:
        return None
    if field.kind == "scalar":
        ok = value is None or type(value) in _SCALAR_TYPES
        size = len(value) if type(value) in (str, bytes) else None
    else:
        ok = type(value) is field.kind
        size = value if field.kind is int else len(value) if ok else None
    if ok and size is not None and (
            (field.low is not None and size < field.low)
            or (field.high is not None and size > field.high)):
        ok = False
    if not ok:
        absent = "missing" if name not in header else f"got {show_value(value)}"
        raise WireError(field.code, f"'{name}' must be {field.what} ({absent})")
    return value


def check_fields(header: dict, fields: dict[str, Field]) -> dict:
    """Every field in `fields` through check_field, in order; returns the header without
    the nil optional ones."""
    dropped = [name for name, field in fields.items()
               if check_field(header, name, field) is None and name in header]
    if not dropped:
        return header
    return {k: v for k, v in header.items() if k not in dropped}


def request_rid(header: Any) -> Any:
    """The header's `rid` if it is a valid one (a reply echoes it), else None."""
    if not isinstance(header, dict):
        return None
    try:
        return check_field(header, "rid", RID_FIELD)
    except WireError:
        return None


def check_frames(op: str, frames: int) -> None:
    """A payload frame is for PAYLOAD_OPS only (push, model.merge): they take exactly 2
    frames, every other op 1."""
    expected = 2 if op in PAYLOAD_OPS else 1
    if frames == expected:
        return
    if op in PAYLOAD_OPS:
        raise WireError(ErrorCode.BAD_REQUEST,
                        f"{op} takes a header frame and a payload frame holding "
                        f"{PAYLOAD_OPS[op]}, got {frames} frames")
    raise WireError(ErrorCode.BAD_REQUEST,
                    f"op {op!r} takes only a header frame, got {frames} frames")


def show_value(value: Any, limit: int = 40) -> str:
    """A short repr for an error message: a hostile value must not make a huge reply."""
    text = f"{type(value).__name__} {value!r}" if value is not None else "nil"
    return text if len(text) <= limit else text[:limit] + "…"


def unpack_reply(frame: bytes) -> dict:
    reply = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    if not isinstance(reply, dict) or "ok" not in reply:
        raise ValueError(f"malformed reply from daemon: {reply!r}"[:200])
    return reply


def ok_reply(rid: Any = None, **fields) -> dict:
    reply = {"v": PROTOCOL_VERSION, "ok": True, **fields}
    if rid is not None:
        reply["rid"] = rid
    return reply


def error_reply(code: str, message: str, rid: Any = None, **fields) -> dict:
    reply = {"v": PROTOCOL_VERSION, "ok": False, "error": code, "message": message, **fields}
    if rid is not None:
        reply["rid"] = rid
    return reply


@dataclass(frozen=True)
class InputSpec:
    """What every pushed sample must look like once the daemon has fixed it."""

    channels: int
    height: int
    width: int
    dtype: str

    @property
    def sample_bytes(self) -> int:
        return self.channels * self.height * self.width * DTYPES[self.dtype].itemsize

    def as_dict(self) -> dict:
        return {"channels": self.channels, "height": self.height, "width": self.width,
                "dtype": self.dtype}


@dataclass
class PushRequest:
    """A validated push. `x` is a zero-copy view over the payload frame's memory."""

    sensor: str
    seq: int
    x: np.ndarray
    labels: list

    @property
    def spec(self) -> InputSpec:
        n, c, h, w = self.x.shape
        return InputSpec(c, h, w, dtype_name(self.x.dtype))


def dtype_name(dtype: np.dtype) -> str:
    """The wire name of a numpy dtype (the inverse of DTYPES); KeyError if it has none."""
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    raise KeyError(dtype)


def check_labels(labels: Any, n: int, max_label_chars: int = MAX_LABEL_CHARS) -> list:
    """Labels are ints or strings, exactly one per sample; 1 and "1" are different labels."""
    if not isinstance(labels, list):
        raise WireError(ErrorCode.BAD_LABEL, "'labels' must be an array with one label per sample")
    if len(labels) != n:
        raise WireError(ErrorCode.BAD_LABEL, f"got {len(labels)} labels for {n} samples")
    for i, label in enumerate(labels):
        kind = type(label)
        if kind is int:
            continue
        if kind is str:
            if 0 < len(label) <= max_label_chars:
                continue
            raise WireError(ErrorCode.BAD_LABEL,
                            f"label {i} is a string of {len(label)} chars; "
                            f"use 1..{max_label_chars}")
        raise WireError(ErrorCode.BAD_LABEL,
                        f"label {i} is {show_value(label)}; labels must be ints or strings")
    return labels


def decode_push(header: dict, payload: Any, *, max_samples: int, max_bytes: int,
                spec: InputSpec | None, max_label_chars: int = MAX_LABEL_CHARS) -> PushRequest:
    """Validate a push header against its payload frame and the daemon's input spec.

    `payload` is anything exposing the buffer protocol (a zmq.Frame's .buffer, bytes). The
    returned array shares that memory: the batch is never copied per sample.
    """
    check_fields(header, OP_FIELDS["push"])
    sensor, seq, shape = header["sensor"], header["seq"], header["shape"]
    if not all(type(d) is int and 0 < d <= MAX_DIM for d in shape):
        raise WireError(ErrorCode.BAD_SHAPE,
                        f"'shape' must be [N, C, H, W] with ints in 1..{MAX_DIM}, "
                        f"got {show_value(shape, 80)}")
    wire_dtype = header["dtype"]
    if wire_dtype not in DTYPES:
        raise WireError(ErrorCode.BAD_DTYPE,
                        f"dtype {show_value(wire_dtype)} is not supported; use one of "
                        f"{sorted(DTYPES)}")
    n = shape[0]
    if n > max_samples:
        raise WireError(ErrorCode.TOO_LARGE,
                        f"{n} samples in one push; this daemon takes at most {max_samples}, "
                        "split the batch")
    if payload is None:
        raise WireError(ErrorCode.BAD_REQUEST, "push needs a second frame holding the samples")
    view = memoryview(payload)
    if view.nbytes > max_bytes:
        raise WireError(ErrorCode.TOO_LARGE,
                        f"payload of {view.nbytes} bytes; this daemon takes at most {max_bytes} "
                        "per push, split the batch")
    dtype = DTYPES[wire_dtype]
    expected = n * shape[1] * shape[2] * shape[3] * dtype.itemsize
    if view.nbytes != expected:
        raise WireError(ErrorCode.BAD_SHAPE,
                        f"payload has {view.nbytes} bytes but shape {shape} of {wire_dtype} "
                        f"needs {expected}")
    if spec is not None:
        if (shape[1], shape[2], shape[3]) != (spec.channels, spec.height, spec.width):
            raise WireError(ErrorCode.BAD_SHAPE,
                            f"samples are {shape[1:]} but this daemon learns "
                            f"[{spec.channels}, {spec.height}, {spec.width}] (C, H, W)")
        if wire_dtype != spec.dtype:
            raise WireError(ErrorCode.BAD_DTYPE,
                            f"samples are {wire_dtype} but this daemon learns {spec.dtype}")
    labels = check_labels(header.get("labels"), n, max_label_chars)
    x = np.frombuffer(view, dtype=dtype).reshape(shape)
    if wire_dtype == "float32":
        # One vectorised pass; NaN fails both comparisons, so it is caught too.
        if not (x.size == 0 or (float(x.min()) >= 0.0 and float(x.max()) <= 1.0)):
            raise WireError(ErrorCode.BAD_VALUE,
                            "float32 samples must be finite and within [0, 1]")
    return PushRequest(sensor=sensor, seq=seq, x=x, labels=labels)


def push_header(sensor: str, seq: int, x: np.ndarray, labels: list, rid: Any = None) -> dict:
    """The header a client sends with `x` (N, C, H, W) as the payload frame."""
    header = {"v": PROTOCOL_VERSION, "op": "push", "sensor": sensor, "seq": int(seq),
              "shape": [int(d) for d in x.shape], "dtype": dtype_name(x.dtype),
              "labels": labels}
    if rid is not None:
        header["rid"] = rid
    return header


def plain_label(label: Any) -> int | str:
    """Turn numpy scalars into the Python int/str msgpack sends; refuse anything else early."""
    if isinstance(label, (bool, np.bool_)):
        raise TypeError(f"label {label!r} is a bool; labels must be ints or strings")
    if isinstance(label, (int, np.integer)):
        return int(label)
    if isinstance(label, (str, np.str_)):
        return str(label)
    raise TypeError(f"label {label!r} is {type(label).__name__}; labels must be ints or strings")
