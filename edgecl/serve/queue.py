"""The hand-off between the socket loop and the learner thread.

Two owners, one lock: the socket loop only ever calls `try_put` (never blocks, so a full
queue becomes a `busy` reply instead of a stalled socket); the learner thread only ever calls
`take` and `done`. Memory is bounded in bytes because that is what an edge device runs out of.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Batch:
    """One accepted push. `x` still points into the received ZeroMQ frame (no copy)."""

    sensor: str
    seq: int
    x: np.ndarray
    labels: list
    first: int                   # stream offset of the first sample, as acked to the client
    accepted_at: float = field(default_factory=time.monotonic)

    @property
    def n(self) -> int:
        return int(self.x.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.x.nbytes)


def joins_group(group_samples: int, n: int, limit: int) -> bool:
    """Whether a push of `n` samples joins the group of `group_samples` being gathered for one
    learner call: yes unless it would take the group past `limit`; an empty group takes any
    push. The live queue and the journal replay both group by this rule, so a replayed
    stream is learned in the same steps as the live one would have been."""
    return group_samples == 0 or group_samples + n <= limit


class IngestQueue:
    """Accepted, not yet learned batches, bounded by `capacity_bytes`.

    Bytes count against the bound from `try_put` until the learner calls `done`, so the
    memory a batch holds while it is being learned is still accounted for.
    """

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = int(capacity_bytes)
        self._cond = threading.Condition()
        self._items: deque[Batch] = deque()
        self._bytes = 0            # queued + being learned
        self._samples = 0          # queued + being learned
        self._waiting = 0          # queued only
        self._closed = False       # no more puts; the learner drains what is left
        self.limit_samples: int | None = None  # a bound in samples too (backpressure's lag)
        self._abandoned = False    # stop now; whatever is left is not learned

    @property
    def bytes(self) -> int:
        return self._bytes

    @property
    def samples(self) -> int:
        return self._samples

    @property
    def waiting(self) -> int:
        """Samples queued and not yet taken by the learner."""
        return self._waiting

    @property
    def batches(self) -> int:
        return len(self._items)

    def free_bytes(self) -> int:
        return max(0, self.capacity_bytes - self._bytes)

    def free_batches(self, nbytes: int, n: int) -> int:
        """How many more batches of `nbytes` bytes and `n` samples fit now."""
        fits = self.free_bytes() // max(1, nbytes)
        if self.limit_samples is not None:
            fits = min(fits, max(0, self.limit_samples - self._samples) // max(1, n))
        return int(fits)

    @property
    def abandoned(self) -> bool:
        return self._abandoned

    def has_room(self, nbytes: int, n: int = 0) -> bool:
        """Would a batch of `nbytes` bytes and `n` samples be taken now? An empty queue
        takes any batch, so a push larger than the whole bound cannot be refused forever."""
        if self._closed:
            return False
        if not self._bytes:
            return True
        limit = self.limit_samples
        return (self._bytes + nbytes <= self.capacity_bytes
                and (limit is None or self._samples + n <= limit))

    def try_put(self, batch: Batch) -> bool:
        """Queue `batch` if it fits (see has_room); never blocks."""
        with self._cond:
            if not self.has_room(batch.nbytes, batch.n):
                return False
            self._items.append(batch)
            self._bytes += batch.nbytes
            self._samples += batch.n
            self._waiting += batch.n
            self._cond.notify()
            return True

    def take(self, max_samples: int, timeout: float) -> list[Batch] | None:
        """Up to `max_samples` samples' worth of batches (at least one batch), waiting up to
        `timeout`. Returns [] on timeout and None once closed and drained, or abandoned."""
        with self._cond:
            if not self._items and not self._closed:
                self._cond.wait(timeout)
            if self._abandoned or (self._closed and not self._items):
                return None
            taken: list[Batch] = []
            total = 0
            while self._items and joins_group(total, self._items[0].n, max_samples):
                batch = self._items.popleft()
                taken.append(batch)
                total += batch.n
            self._waiting -= total
            return taken

    def take_behind(self, keep_samples: int) -> list[Batch]:
        """The oldest queued batches beyond the newest `keep_samples` samples' worth (whole
        batches, in stream order); never blocks. The real-time policy offers these to the
        replay buffer instead of training on them (docs/overload.md)."""
        with self._cond:
            behind: list[Batch] = []
            while self._items and self._waiting - self._items[0].n >= keep_samples:
                batch = self._items.popleft()
                behind.append(batch)
                self._waiting -= batch.n
            return behind

    def done(self, batches: list[Batch]) -> None:
        """The learner has finished with these batches: release their share of the bound."""
        with self._cond:
            for batch in batches:
                self._bytes -= batch.nbytes
                self._samples -= batch.n

    def close(self) -> None:
        """Refuse new batches; the learner still drains the queued ones."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def abandon(self) -> int:
        """Stop the learner after its current step. Returns how many samples stay unlearned."""
        with self._cond:
            self._closed = True
            self._abandoned = True
            self._cond.notify_all()
            return self._samples


class BusyLine:
    """Sensors answered `busy`, in the order they were first refused. When room frees up,
    the ones refused first are admitted first: retries are served in arrival order, so the
    ack wait is bounded and every sensor gets its share. A sensor that stops retrying
    leaves the line after `expire_s`."""

    def __init__(self, expire_s: float):
        self.expire_s = float(expire_s)
        self._line: OrderedDict[str, float] = OrderedDict()  # sensor -> last refusal

    def __len__(self) -> int:
        return len(self._line)

    def admits(self, sensor: str, fits: int, now: float) -> bool:
        """May `sensor` take one of the `fits` free places now? True leaves the line."""
        while self._line:
            first, last_seen = next(iter(self._line.items()))
            if now - last_seen <= self.expire_s:
                break
            del self._line[first]
        if not self._line:
            return True
        for position, waiting in enumerate(self._line):
            if position >= fits:
                return False
            if waiting == sensor:
                del self._line[sensor]
                return True
        return fits > len(self._line)  # room for every sensor in line and this one too

    def refused(self, sensor: str, now: float) -> None:
        """`sensor` got `busy`: it joins the end of the line, or keeps its place."""
        self._line[sensor] = now


class SeenSequences:
    """Which (sensor, seq) pushes were accepted recently, so a retry is acked but not learned
    twice. Bounded: `window` seqs per sensor and `max_sensors` sensors, oldest forgotten first.
    A retry only ever repeats a push still in the client's credit window, far inside `window`.
    """

    def __init__(self, window: int, max_sensors: int = 10_000):
        self.window = int(window)
        self.max_sensors = int(max_sensors)
        self._by_sensor: OrderedDict[str, OrderedDict[int, tuple[int, int]]] = OrderedDict()

    def lookup(self, sensor: str, seq: int) -> tuple[int, int] | None:
        """The (first, n) acked for this push before, or None if it is new."""
        seqs = self._by_sensor.get(sensor)
        return None if seqs is None else seqs.get(seq)

    def record(self, sensor: str, seq: int, first: int, n: int) -> None:
        seqs = self._by_sensor.get(sensor)
        if seqs is None:
            seqs = self._by_sensor[sensor] = OrderedDict()
            if len(self._by_sensor) > self.max_sensors:
                self._by_sensor.popitem(last=False)
        else:
            self._by_sensor.move_to_end(sensor)
        seqs[seq] = (first, n)
        if len(seqs) > self.window:
            seqs.popitem(last=False)

    def __len__(self) -> int:
        return len(self._by_sensor)

    def state_dict(self) -> dict:
        """Plain lists, oldest first, for checkpoints (edgecl/serve/checkpoints.py)."""
        return {"sensors": [[sensor, [[seq, first, n] for seq, (first, n) in seqs.items()]]
                            for sensor, seqs in self._by_sensor.items()]}

    def load_state_dict(self, state: dict) -> None:
        self._by_sensor.clear()
        for sensor, seqs in state["sensors"]:
            for seq, first, n in seqs:
                self.record(sensor, seq, first, n)
