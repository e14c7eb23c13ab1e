"""How fresh the published model is: for every learned sample, the time from its ack to the
first published snapshot that learned it (its "snapshot age"), split into the wait to be
learned (queue) and the wait from learning to publication (schedule + export).

Granularity is one push: a push's samples share its ack time and the time the learner
reached it. Held-out samples are counted like the others (they are 1 in 20). Samples covered
by a rejected snapshot stay pending until a later one is published.
"""
from __future__ import annotations

import threading
import time
from collections import deque

WINDOW_SAMPLES = 20_000   # ages kept for the figures: about the last this many samples


class Freshness:
    """Learner thread: `learned`, `take`. Export thread: `published`, `rejected`. Any: `summary`."""

    def __init__(self, window_samples: int = WINDOW_SAMPLES):
        self.window_samples = window_samples
        self._lock = threading.Lock()
        self._pending: list[tuple[float, float, int]] = []  # (acked, learned, n), learner-owned
        self._carry: list[tuple[float, float, int]] = []    # back from a rejected export
        self._ages: deque[tuple[float, float, int]] = deque()  # (age, queue wait, n)
        self._kept = 0
        self._last_batches = None

    def learned(self, batches) -> None:
        """The learner is on `batches` (each with accepted_at and n): note them once."""
        if not batches or batches is self._last_batches:
            return
        self._last_batches = batches
        now = time.monotonic()
        self._pending.extend((b.accepted_at, now, b.n) for b in batches)

    def take(self) -> list[tuple[float, float, int]]:
        """What a snapshot copied now covers (and no later snapshot will again)."""
        with self._lock:
            covered, self._carry = self._carry + self._pending, []
        self._pending = []
        return covered

    def published(self, covered: list, at: float | None = None) -> None:
        at = time.monotonic() if at is None else at
        with self._lock:
            for acked, learned, n in covered:
                self._ages.append((at - acked, learned - acked, n))
                self._kept += n
            while self._ages and self._kept - self._ages[0][2] >= self.window_samples:
                self._kept -= self._ages.popleft()[2]

    def rejected(self, covered: list) -> None:
        with self._lock:
            self._carry = covered + self._carry

    def summary(self) -> dict | None:
        """Median and p95 (sample-weighted) of the snapshot age and of its queue part, in s."""
        with self._lock:
            ages = list(self._ages)
        if not ages:
            return None
        return {"samples": sum(n for _, _, n in ages),
                "median_s": round(weighted_quantile([(a, n) for a, _, n in ages], 0.5), 3),
                "p95_s": round(weighted_quantile([(a, n) for a, _, n in ages], 0.95), 3),
                "queue_median_s": round(weighted_quantile([(w, n) for _, w, n in ages], 0.5), 3),
                "queue_p95_s": round(weighted_quantile([(w, n) for _, w, n in ages], 0.95), 3)}


def weighted_quantile(values: list[tuple[float, int]], q: float) -> float:
    """The smallest value v with at least a q share of the weight at or below v."""
    ordered = sorted(values)
    total = sum(n for _, n in ordered)
    seen = 0
    for value, n in ordered:
        seen += n
        if seen >= q * total:
            return value
    return ordered[-1][0]
