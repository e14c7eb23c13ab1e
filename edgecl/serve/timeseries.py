"""The daemon's story over time, for `edgecl report`: a bounded time series in the state
directory (STATE/timeseries.jsonl) that survives restarts.

Started by the daemon in its learner thread (`start_recorder`); it only reads. A learner hook (learner thread, the
file's only writer) appends one JSON line:

- a point every POINT_INTERVAL_S while the daemon runs (and one at shutdown): samples
  learned and received, queue depth, prequential accuracy overall, recent and per class, and
  the learning rate;
- an event when a class first appears, when a snapshot is published (its held-out accuracy,
  fp32 and int8), when the parity gate rejects one, and when the daemon starts.

Bounded: when MAX_POINTS points are on file, every other one is dropped (the whole history
stays, older parts at coarser steps) and the file is rewritten atomically; snapshot, rejection
and start events keep their newest MAX_EVENTS each. A point costs about 110 bytes plus 14 per
class (BYTES_PER_POINT), so with 10 classes the file stays under ~0.6 MB (points) plus ~0.1 MB
(events).
Telemetry, not data: lines are not fsynced, and a torn last line after a crash is skipped.
"""
from __future__ import annotations

import json
import logging
import time
from datetime import datetime
from pathlib import Path

from edgecl.files import write_atomic

log = logging.getLogger("edgecl.timeseries")

FILE = "timeseries.jsonl"
POINT_INTERVAL_S = 2.0
MAX_POINTS = 2048        # on file at most; compaction halves them
MAX_EVENTS = 512         # snapshot, rejected and start events kept (newest)
BYTES_PER_POINT = (110, 14)  # about: fixed + per class (a test measures it)


def read(path: Path) -> list[dict]:
    """Every whole record of a time series file, in order (torn or foreign lines skipped)."""
    records = []
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return records
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "k" in record:
            records.append(record)
    return records


class TimeSeries:
    """The file and its records in memory; `append` writes one line, compacting when full."""

    def __init__(self, path: Path, max_points: int = MAX_POINTS, max_events: int = MAX_EVENTS):
        self.path = Path(path)
        self.max_points, self.max_events = max_points, max_events
        self.records = read(self.path)

    def points(self) -> list[dict]:
        return [r for r in self.records if r["k"] == "point"]

    def append(self, record: dict) -> None:
        self.records.append(record)
        if record["k"] == "point" and len(self.points()) >= self.max_points:
            self.compact()
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record, separators=(",", ":")) + "\n")

    def forget_after(self, samples_learned: int) -> None:
        """Drop points past `samples_learned`: after a restart the journal replays them."""
        kept = [r for r in self.records if r["k"] != "point" or r["n"] <= samples_learned]
        if len(kept) != len(self.records):
            self.records = kept
            self.rewrite()

    def compact(self) -> None:
        """Every other point (the first and the newest always kept, so the whole stream stays
        covered); the newest events of each kind."""
        points = self.points()
        keep = {id(p) for p in points[::2] + points[-1:]}
        recent = {id(r) for kind in ("snapshot", "rejected", "start")
                  for r in [r for r in self.records if r["k"] == kind][-self.max_events:]}
        self.records = [r for r in self.records if id(r) in keep or id(r) in recent
                        or r["k"] not in ("point", "snapshot", "rejected", "start")]
        self.rewrite()

    def rewrite(self) -> None:
        text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in self.records)
        write_atomic(self.path, text.encode())


class Recorder:
    """Reads the daemon's status and the learner in the learner thread; writes the series."""

    def __init__(self, daemon, series: TimeSeries, interval_s: float | None = None,
                 store=None):
        self.daemon, self.series = daemon, series
        self.store = store  # the SnapshotStore, when snapshots are on: published versions
        self.interval_s = POINT_INTERVAL_S if interval_s is None else interval_s
        self._classes = {r["label"] for r in series.records if r["k"] == "class"}
        self._versions = {r["v"] for r in series.records if r["k"] == "snapshot"}
        rejected = [r["t"] for r in series.records if r["k"] == "rejected"]
        self._last_rejected = rejected[-1] if rejected else None
        self._due = 0.0

    def on_step(self, learner, samples_learned: int, final: bool) -> None:
        labels = learner.labels
        if len(labels) > len(self._classes):
            self._note_classes(labels, samples_learned)
        now = time.monotonic()
        if now < self._due and not final:
            return
        self._due = now + self.interval_s
        status = self.daemon.status()
        self._note_snapshots(status)
        self.series.append(point(status, samples_learned, learning_rate(learner)))

    def on_idle(self, learner, samples_learned: int) -> None:
        self.on_step(learner, samples_learned, False)

    def _note_classes(self, labels, samples_learned: int) -> None:
        for label in labels:
            if str(label) not in self._classes:
                self._classes.add(str(label))
                self.series.append({"k": "class", "label": str(label), "n": samples_learned,
                                    "t": round(time.time(), 3)})

    def _note_snapshots(self, status: dict) -> None:
        for version in status.get("snapshot_versions") or ():
            if version in self._versions or self.store is None:
                continue
            self._versions.add(version)
            meta = self.store.meta(version)
            held = meta.get("heldout") or {}
            int8 = (meta.get("int8") or {}).get("published", True)  # False: fp32 went alone
            self.series.append({"k": "snapshot", "v": version, "n": meta.get("samples_learned"),
                                "t": meta.get("created_unix"), "fp32": held.get("accuracy_fp32"),
                                "int8": held.get("accuracy_int8") if int8 else None,
                                "rollback_of": meta.get("rollback_of")})
        failure = status.get("snapshot_last_failure") or {}
        when = _unix(failure.get("time"))
        if when is not None and when != self._last_rejected:
            self._last_rejected = when
            self.series.append({"k": "rejected", "n": failure.get("samples_learned"), "t": when,
                                "failures": (failure.get("failures") or [])[:3],
                                "fp32_published": bool(failure.get("fp32_published"))})


def point(status: dict, samples_learned: int, lr: float | None) -> dict:
    """One sample of the figures `edgecl report` draws over time."""
    per_class = {str(e["label"]): round(e["acc"], 4) for e in status.get("per_class_acc", ())}
    return {"k": "point", "t": round(time.time(), 3), "n": samples_learned,
            "r": status.get("samples_received"), "q": status.get("queue_depth"),
            "acc": _round(status.get("prequential_acc")),
            "win": _round(status.get("prequential_acc_window")), "lr": lr, "pc": per_class}


def learning_rate(learner) -> float | None:
    """The student optimizer's current rate (None before the first sample builds it)."""
    optimizer = getattr(learner, "optimizer", None)
    try:
        return float(optimizer.param_groups[0]["lr"])
    except (AttributeError, IndexError, KeyError, TypeError):
        return None


def _round(value):
    return None if value is None else round(float(value), 4)


def _unix(iso: str | None) -> float | None:
    try:
        return round(datetime.fromisoformat(iso).timestamp(), 3)
    except (TypeError, ValueError):
        return None


def start_recorder(daemon, store=None) -> Recorder:
    """Keep `daemon`'s STATE/timeseries.jsonl, with the snapshots published in `store`."""
    series = TimeSeries(Path(daemon.state_dir) / FILE)
    series.forget_after(daemon.samples_learned)
    series.append({"k": "start", "t": round(time.time(), 3), "n": daemon.samples_learned})
    recorder = Recorder(daemon, series, store=store)
    daemon.add_learner_hook(recorder.on_step)
    daemon.add_idle_hook(recorder.on_idle)
    return recorder
