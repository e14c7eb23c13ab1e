"""Federation on the daemon: `model.get` (read the student), `model.merge` (merge a global
model in) and `model.stats` (per-class embedding statistics of the replay buffer under a
candidate global model, for the server's head calibration), for a site's Flower client. Built on the daemon's extension points, like the
snapshot service:

- The socket loop never runs torch. Its handlers check a request (a merge completely: names,
  shapes, labels, class count, payload size, finite values) against the student's layout,
  which the learner thread publishes as plain data, then post the request and hold the reply
  (long poll, `wait_ms`).
- The learner thread, between two learning steps (a learner hook) or when the stream is idle
  (an idle hook), copies the student into numpy, applies the merge or computes the
  statistics on a copy (edgecl/learn/merge.py), and leaves the outcome for the held
  request. Acked samples are
  not touched: they stay queued, and are learned once, before or after the merge.
- A merge marks the model changed for the snapshot service (a new snapshot although nothing
  new was learned) and for the checkpoint keeper; `merge_id` and the merge counters are in
  every checkpoint. A merge not checkpointed when the daemon crashes is lost (docs/learning.md).
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from math import prod
from typing import Any

import numpy as np

from edgecl.wire import (DEFAULT_STATS_RANK, INT64_MAX, ErrorCode, WireError, check_labels,
                         show_value)

log = logging.getLogger("edgecl.federation")

DEFAULT_WAIT_MS = 30_000  # model.get without wait_ms: how long the learner may take to answer
KEPT_MERGES = 16          # merge outcomes remembered for held (and repeated) requests
_TICKET = object()        # header key of a held request's ticket (no client can send it)
_DUPLICATE = object()     # header key: this merge repeats the last merge_id


class FederationService:
    """The ops' socket-loop halves, and the learner hook that does their work."""

    def __init__(self, daemon, bn: str):
        self.daemon = daemon
        self.bn = bn
        self._lock = threading.Lock()
        self._pending: list[tuple[int, str, Any]] = []  # (ticket, kind, request): loop -> learner
        self._gets: dict[int, Any] = {}  # ticket -> get or stats reply fields, or WireError
        self._abandoned: set[int] = set()  # gets whose wait ended while the learner read
        self._merges: OrderedDict[int, Any] = OrderedDict()
        self._tickets = 0
        self.layout: dict | None = None  # the student's arrays, as data (learner thread sets)
        self._layout_of = None           # the student object the layout describes
        self._last_merge: tuple[str, int | None] | None = None  # (merge_id, ticket): loop
        self.applied_merge_id: str | None = None  # learner thread; in every checkpoint

    # -- learner thread ---------------------------------------------------------------------

    def on_step(self, learner, samples_learned: int, final: bool = False) -> None:
        """Learner and idle hook: publish the layout when the student is new, then answer
        what the socket loop posted."""
        if getattr(learner, "student", None) is not None and learner.student is not self._layout_of:
            self._publish_layout(learner)
        with self._lock:
            work, self._pending = self._pending, []
        for ticket, kind, request in work:
            try:
                outcome = self._work(learner, kind, request)
            except Exception as exc:
                log.exception("model.%s failed in the learner thread", kind)
                outcome = WireError(ErrorCode.INTERNAL, f"model.{kind} failed in the learner: "
                                                        f"{type(exc).__name__}: {exc}"[:250])
            with self._lock:
                if kind != "merge" and ticket in self._abandoned:
                    self._abandoned.discard(ticket)  # nobody waits for it any more
                elif kind != "merge":
                    self._gets[ticket] = outcome
                else:
                    self._merges[ticket] = outcome
                    while len(self._merges) > KEPT_MERGES:
                        self._merges.popitem(last=False)

    def _work(self, learner, kind: str, request: Any) -> dict:
        if kind == "get":
            return self._read(learner)
        if kind == "stats":
            return self._stats(learner, request)
        return self._merge(learner, request)

    def _stats(self, learner, request: dict) -> dict:
        out = learner.class_statistics(request["arrays"], bn=self.bn, rank=request["rank"])
        return {"labels": out["labels"], "counts": out["counts"], "bn": self.bn,
                "arrays": [{"name": name, "dtype": "float32", "shape": list(out[name].shape),
                            "data": np.ascontiguousarray(out[name], "<f4").tobytes()}
                           for name in ("mean", "var", "components")]}

    def _publish_layout(self, learner) -> None:
        from edgecl.learn.merge import layout
        self.layout = layout(learner)
        self._layout_of = learner.student

    def _read(self, learner) -> dict:
        arrays = learner.model_arrays()
        return {**self._counters(learner), "arch": self.layout["arch"],
                "arrays": [{"name": name, "dtype": "float32", "shape": list(a.shape),
                            "data": a.tobytes()} for name, a in arrays]}

    @staticmethod
    def _counters(learner) -> dict:
        labels = list(learner.labels)
        counts = list(learner.class_counts)
        return {"labels": labels, "counts": counts + [0] * (len(labels) - len(counts)),
                "samples_learned": int(learner.samples_learned),
                "learned_since_merge": int(learner.learned_since_merge),
                "merges": int(learner.merges)}

    def _merge(self, learner, request: dict) -> dict:
        out = learner.merge_global(request["labels"], request["arrays"], bn=self.bn)
        if request["merge_id"] is not None:
            self.applied_merge_id = request["merge_id"]
        self.daemon.keeper.learner_changed()
        if self.daemon.snapshots is not None:
            self.daemon.snapshots.model_changed()
        log.info("merged a global model (%d labels, %d new; merge %s): %d merges",
                 len(request["labels"]), len(out["added"]), request["merge_id"], out["merges"])
        counters = self._counters(learner)
        return {"merged": True, "labels": counters["labels"], "added": out["added"],
                "samples_learned": counters["samples_learned"], "merges": counters["merges"]}

    def state_dict(self) -> dict:
        return {"applied_merge_id": self.applied_merge_id}

    def load_state_dict(self, state: dict) -> None:
        """At start (learner thread): the checkpoint's last merge_id, for the socket loop."""
        self.applied_merge_id = state.get("applied_merge_id")
        if self.applied_merge_id is not None:
            last = (self.applied_merge_id, None)
            self.daemon.call_in_loop(lambda: setattr(self, "_last_merge", last))

    # -- socket loop ------------------------------------------------------------------------

    def _post(self, kind: str, request: Any) -> int:
        with self._lock:
            self._tickets += 1
            self._pending.append((self._tickets, kind, request))
            return self._tickets

    def _require_layout(self) -> dict:
        layout = self.layout
        if layout is None:
            raise WireError(ErrorCode.NO_MODEL, "this daemon has no student yet: it builds one "
                            "when it learns its first sample; push samples, then ask again")
        return layout

    def op_get(self, header: dict, payload) -> dict | None:
        """Post a read for the learner thread; held until it answers (or `busy` after
        wait_ms)."""
        if _TICKET not in header:
            self._require_layout()
            header.setdefault("wait_ms", DEFAULT_WAIT_MS)
            header[_TICKET] = self._post("get", None)
            return None  # held: the learner answers between two steps
        return self._held_reply(header, "model.get")

    def op_stats(self, header: dict, payload) -> dict | None:
        """Check the candidate model like a merge, post it for the learner thread (which
        computes the statistics on a copy: nothing is merged) and hold the reply."""
        if _TICKET not in header:
            request = self._check_merge(header, payload, new_classes_ok=True)
            request["rank"] = header.get("rank", DEFAULT_STATS_RANK)
            header.setdefault("wait_ms", DEFAULT_WAIT_MS)
            header[_TICKET] = self._post("stats", request)
            return None
        return self._held_reply(header, "model.stats")

    def _held_reply(self, header: dict, op: str) -> dict | None:
        """A held get or stats request's reply once the learner left it; `busy` (and the
        request withdrawn) when its wait_ms ran out first."""
        ticket, expired = header[_TICKET], header["wait_ms"] == 0
        with self._lock:
            outcome = self._gets.pop(ticket, None)
            if outcome is None and expired:  # the wait is over: withdraw the request
                self._pending = [p for p in self._pending if p[0] != ticket]
                self._abandoned.add(ticket)
        return _answer(outcome, expired, f"the learner did not answer {op} within "
                                         "wait_ms (a long step, a checkpoint); retry")

    def op_merge(self, header: dict, payload) -> dict | None:
        """Check the whole merge here, queue it for the learner thread, and answer `queued`
        at once or, with wait_ms, once it is applied."""
        if _TICKET not in header:
            request = self._check_merge(header, payload)
            merge_id = request["merge_id"]
            last = self._last_merge
            if merge_id is not None and last is not None and last[0] == merge_id:
                header[_TICKET], header[_DUPLICATE] = last[1], True
            else:
                ticket = self._post("merge", request)
                header[_TICKET] = ticket
                self._last_merge = (merge_id, ticket) if merge_id is not None else last
                self.daemon.note_classes(request["labels"])
        return self._merge_reply(header)

    def _merge_reply(self, header: dict) -> dict | None:
        ticket, wait_ms = header[_TICKET], header.get("wait_ms", 0)
        extra = {"duplicate": True} if header.get(_DUPLICATE) else {}
        if "merge_id" in header:
            extra["merge_id"] = header["merge_id"]
        if ticket is None:  # applied before this daemon started
            return {"merged": True, **extra}
        with self._lock:
            outcome = self._merges.get(ticket)
            pending = any(p[0] == ticket for p in self._pending)
        if outcome is None and not pending and ticket <= self._oldest_outcome():
            return {"merged": True, **extra}  # applied long ago: its figures are forgotten
        if outcome is None:
            if wait_ms > 0:
                return None
            return {"queued": True, **extra}
        if isinstance(outcome, WireError):
            raise outcome
        return {**outcome, **extra}

    def _oldest_outcome(self) -> int:
        """Tickets at or below this one were settled and may have been forgotten."""
        with self._lock:
            return next(iter(self._merges), 0) - 1 if self._merges else 0

    def _check_merge(self, header: dict, payload, new_classes_ok: bool = False) -> dict:
        """Everything about a merge (or a stats request's model) that can be wrong, before
        it is queued. A stats request adds no class, so serve.max_classes does not apply."""
        layout = self._require_layout()
        labels = check_labels(header["labels"], len(header["labels"]),
                              self.daemon.config.serve.max_label_chars)
        if len(set(labels)) != len(labels):
            raise WireError(ErrorCode.BAD_LABEL, "labels: a label appears twice")
        counts = header.get("counts")
        if counts is not None and (len(counts) != len(labels) or not all(
                type(c) is int and 0 <= c <= INT64_MAX for c in counts)):
            raise WireError(ErrorCode.BAD_REQUEST, "counts: expected one int >= 0 per label")
        shapes = _check_specs(header["arrays"], layout, len(labels))
        if not new_classes_ok:
            self._check_class_count(labels)
        arrays = _decode_arrays(payload, layout["names"], shapes)
        return {"labels": labels, "counts": counts, "arrays": arrays,
                "merge_id": header.get("merge_id")}

    def _check_class_count(self, labels: list) -> None:
        known = self.daemon._classes
        new = set(labels) - known
        limit = self.daemon.config.serve.max_classes
        if new and len(known) + len(new) > limit:
            raise WireError(ErrorCode.TOO_MANY_CLASSES,
                            f"the global model brings {len(new)} new classes; the daemon has "
                            f"{len(known)} and learns at most {limit} (serve.max_classes)")


def _answer(outcome, expired: bool, late: str) -> dict | None:
    if isinstance(outcome, WireError):
        raise outcome
    if outcome is not None:
        return outcome
    if expired:
        raise WireError(ErrorCode.BUSY, late)
    return None


def _check_specs(specs: list, layout: dict, rows: int) -> list[list[int]]:
    """Each {name, dtype, shape} against the student's array of that place; head arrays
    have one row per global label. Returns the shapes."""
    names = layout["names"]
    if len(specs) != len(names):
        raise WireError(ErrorCode.BAD_REQUEST, f"arrays: the student has {len(names)} arrays, "
                        f"got {len(specs)}; send every array of model.get, in its order")
    shapes = []
    for i, (spec, name, shape, head) in enumerate(zip(specs, names, layout["shapes"],
                                                      layout["head"])):
        if type(spec) is not dict or spec.get("name") != name:
            got = spec.get("name") if type(spec) is dict else spec
            raise WireError(ErrorCode.BAD_REQUEST, f"arrays[{i}]: expected a map with name "
                            f"{name!r}, got {show_value(got)}")
        if spec.get("dtype") != "float32":
            raise WireError(ErrorCode.BAD_DTYPE, f"arrays[{i}] ({name}): dtype must be "
                            f"'float32', got {show_value(spec.get('dtype'))}")
        expected = [rows, *shape[1:]] if head else list(shape)
        got = spec.get("shape")
        if type(got) is not list or any(type(d) is not int for d in got) or got != expected:
            raise WireError(ErrorCode.BAD_SHAPE, f"arrays[{i}] ({name}): shape must be "
                            f"{expected}, got {show_value(got, 80)}")
        shapes.append(expected)
    return shapes


def _decode_arrays(payload, names: list, shapes: list) -> dict[str, np.ndarray]:
    """The payload as float32 arrays (a copy: the frame is not kept); bad_shape if its size
    is not the arrays' total, bad_value if any value is NaN or infinite."""
    if payload is None:
        raise WireError(ErrorCode.BAD_REQUEST, "model.merge and model.stats need a payload "
                        "frame")
    sizes = [prod(shape) for shape in shapes]
    view = memoryview(payload)
    if view.nbytes != 4 * sum(sizes):
        raise WireError(ErrorCode.BAD_SHAPE, f"payload has {view.nbytes} bytes; the arrays' "
                        f"shapes need {4 * sum(sizes)} (float32, concatenated in order)")
    values = np.frombuffer(view, dtype="<f4").copy()
    if not np.isfinite(values).all():
        raise WireError(ErrorCode.BAD_VALUE, "the arrays hold NaN or infinite values")
    arrays, offset = {}, 0
    for name, shape, size in zip(names, shapes, sizes):
        arrays[name] = values[offset:offset + size].reshape(shape)
        offset += size
    return arrays


def start_federation(daemon) -> FederationService:
    """model.get, model.merge and model.stats on `daemon`, with their hooks and
    checkpointed state."""
    service = FederationService(daemon, daemon.config.federation.bn)
    daemon.add_state_part("federation", service.state_dict, service.load_state_dict)
    daemon.add_learner_hook(service.on_step)
    daemon.add_idle_hook(lambda learner, samples: service.on_step(learner, samples))
    daemon.register_op("model.get", service.op_get, long_poll=True)
    daemon.register_op("model.merge", service.op_merge, long_poll=True)
    daemon.register_op("model.stats", service.op_stats, long_poll=True)
    return service
