"""The stream's counts, in one object: what was received (the socket loop's side) and what
became of it (the learner thread's side). Each side has one writer; the restart sets both
(the journal half before the threads start, the checkpoint half in the learner thread before
it learns). `status`, /metrics and checkpoints read them here.
"""
from __future__ import annotations

import threading


class StreamCounts:
    """Samples and pushes since the state directory began (restarts included)."""

    def __init__(self):
        # Received: written by the socket loop only; plain ints, read by others as they are.
        self.next_offset = 0          # stream offset the next accepted push starts at
        self.samples_received = 0
        self.batches_received = 0
        self.samples_duplicate = 0    # samples of pushes answered `duplicate: true`
        # Consumed: written by the learner thread, under `_lock` (read by any thread).
        self._lock = threading.Lock()
        self._learned = self._offered = self._failed = 0

    # -- the socket loop --------------------------------------------------------------------

    def accepted(self, n: int) -> None:
        """A push of `n` samples was accepted at offset `next_offset`."""
        self.next_offset += n
        self.samples_received += n
        self.batches_received += 1

    def restore_received(self, next_offset: int, duplicates: int, batches: int) -> None:
        """The received side as the journal and the checkpoint file names give it at start
        (before the socket loop runs)."""
        self.next_offset = self.samples_received = next_offset
        self.samples_duplicate = duplicates
        self.batches_received = batches

    # -- the learner thread -----------------------------------------------------------------

    def consumed(self, learned: int = 0, offered: int = 0, failed: int = 0) -> None:
        with self._lock:
            self._learned += learned
            self._offered += offered
            self._failed += failed

    def restore_consumed(self, counters: dict) -> None:
        """The consumed side as a checkpoint's `counters` recorded it."""
        with self._lock:
            self._learned = int(counters["samples_learned"])
            self._failed = int(counters["samples_failed"])
            self._offered = int(counters.get("samples_offered", 0))  # none in older files

    # -- any thread -------------------------------------------------------------------------

    def consumed_counts(self) -> tuple[int, int, int]:
        """(learned, offered, failed), read together."""
        with self._lock:
            return self._learned, self._offered, self._failed

    @property
    def samples_learned(self) -> int:
        return self._learned

    @property
    def samples_offered(self) -> int:
        return self._offered

    @property
    def samples_failed(self) -> int:
        return self._failed

    def checkpointed(self) -> dict:
        """The counts a checkpoint keeps (its `counters`, with the keeper's batches_covered)."""
        learned, offered, failed = self.consumed_counts()
        return {"samples_learned": learned, "samples_offered": offered,
                "samples_failed": failed, "samples_duplicate": self.samples_duplicate}
