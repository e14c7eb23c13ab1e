"""The learner thread of `edgecl serve`, and what it needs of a learner.

- `Learner` (and OffersToBuffer, HasSettings) are the serve side's contract with
  edgecl.learn, as types: OnlineLearner is one such learner; tests and benchmarks pass
  lighter ones (tests/load_sensors.py's RecordingLearner).
- `LearnerThread` is the only code that calls the learner. It builds it (importing torch
  there, after the socket loop already acks), restores the checkpoint, starts the features,
  replays the journal, then takes batches from the bounded queue and learns them; every
  `stats_interval_s` it publishes `learner.stats()` as a fresh dict (swapped under a lock)
  for `status` and /metrics. It writes the stream counts' consumed side (learned, offered,
failed; edgecl/serve/counters.py). It is one half
  of `edgecl.serve.daemon.Daemon`, whose __init__ sets the state it works on.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from edgecl.errors import UserError
from edgecl.serve.queue import Batch
from edgecl.threads import lower_this_thread

log = logging.getLogger("edgecl.serve")

LEARNER_NICENESS = 5        # the learner and exports yield cores to the socket loop
FIRST_STEP_S = 0.4          # assumed step time until the learner has timed one

LearnerHook = Callable[[Any, int, bool], None]


class Learner(Protocol):
    """Learns a stream one `learn_many` call (one step) at a time; checkpointed whole."""

    labels: list              # the classes met so far, in the order they appeared
    steps: int                # learning steps taken (checkpoint cadence)
    samples_learned: int

    def learn_many(self, x: Any, y: Sequence) -> dict: ...

    def stats(self) -> dict: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@runtime_checkable
class OffersToBuffer(Protocol):
    """A learner the real-time overload policy can run: it takes samples it has no time to
    train on into its replay buffer (docs/overload.md)."""

    def offer_many(self, x: Any, y: Sequence) -> Any: ...


@runtime_checkable
class Federates(Protocol):
    """A learner that can be one site of a federation (model.get, model.merge, model.stats;
    edgecl/serve/federation.py): OnlineLearner."""

    def model_arrays(self) -> list: ...

    def merge_global(self, labels: Sequence, arrays: dict, bn: str = "global") -> dict: ...

    def class_statistics(self, arrays: dict, bn: str = "global", rank: int = 16) -> dict: ...


@runtime_checkable
class HasSettings(Protocol):
    """A learner whose settings a restored checkpoint's can be compared with."""

    config: Any


class LearnerThread:
    """The learner thread's methods: load, replay, learn or offer, publish stats."""

    def _init_learner_side(self) -> None:
        """Fields owned by the learner thread; other threads read them under _stats_lock."""
        self._stats_lock = threading.Lock()
        self._learner_stats: dict = {}
        self.learn_rate: float | None = None  # samples/s the learner can train (see _note_step)
        self._step_s: float | None = None     # seconds per learn step, moving average
        if self.config.serve.overload == "backpressure":  # a first guess until a step is timed
            self.queue.limit_samples = self.lag_samples()
        self.learner_error: str | None = None
        self._learner_hooks: list[LearnerHook] = []
        self.current_batches: list[Batch] = []  # what the learner is on (for learner hooks)
        self._idle_hooks: list[Callable[[Any, int], None]] = []
        self.snapshots = None    # SnapshotService, built by _start_features when enabled
        self.timeseries = None   # the time series Recorder, likewise
        self.federation = None   # FederationService (model.get, model.merge), likewise

    def _check_learner(self) -> None:
        if self.config.serve.overload == "realtime" and not isinstance(self.learner,
                                                                       OffersToBuffer):
            raise UserError("serve.overload = 'realtime' needs a learner with offer_many(); "
                            "use 'backpressure' with this learner")

    def _load(self) -> None:
        """Learner thread, before learning: build the learner, load the newest checkpoint
        into it and start the features. All the torch work of a start happens here, while
        the socket loop already acks pushes (they queue behind the journal replay)."""
        if self.learner is None:
            from edgecl.learn import OnlineLearner
            self.learner = OnlineLearner(self._learner_config())
            self._check_learner()
        self.keeper.restore_learner()
        self._start_features()
        self.keeper.restore_parts()
        labels = list(self.learner.labels)
        self.call_in_loop(lambda: self.note_classes(labels))
        self.call_in_loop(self.ready.set)  # after the merges queued before it

    def _start_features(self) -> None:
        """The features that ride on the daemon, each registering its ops, hooks and state
        parts through the extension points: snapshots (which bring torch and ONNX in, hence
        the learner thread), with the learner routed through their held-out slice, then the
        time series, which reads the snapshot store, then federation (model.get/merge)."""
        from edgecl.export.service import HeldOutRouter, start_snapshots
        from edgecl.serve.federation import start_federation
        from edgecl.serve.timeseries import start_recorder

        if self.config.snapshots.enabled:
            self.snapshots = start_snapshots(self)
            self.learner = HeldOutRouter(self.learner, self.snapshots.heldout)
        self.timeseries = start_recorder(self, self.snapshots.store if self.snapshots else None)
        if isinstance(self.learner, Federates):
            self.federation = start_federation(self)

    def _learner_config(self):
        """The configured LearnerConfig; unless `learner.threads` is set, torch gets all cores
        but one, so the socket loop always has a core to answer on (status p99 under load)."""
        learner_config = self.config.learner_config()
        if learner_config.threads is None:
            learner_config.threads = max(1, (os.cpu_count() or 2) - 1)
        return learner_config

    def _learn_loop(self) -> None:
        """The only code that touches the learner. Ends when the queue is closed and drained.

        learn_many errors are contained per step (see _learn). Anything else escaping here is a
        bug in edgecl: the daemon then stops (exit 1) rather than ack samples it can never learn.
        """
        lower_this_thread(LEARNER_NICENESS)
        try:
            try:
                self._load()
            except UserError as exc:  # a checkpoint that does not load, ...: one line, exit 2
                log.error("%s", exc)
                self.load_error = str(exc)
                self.exit_code = 2
                self.stop()
                self.stop()
                self.queue.abandon()
                return
            self._learn_until_drained()
        except Exception as exc:
            log.exception("learner thread crashed; stopping the daemon")
            if not self.ready.is_set():
                self.load_error = f"the learner could not be loaded: {type(exc).__name__}: {exc}"
            with self._stats_lock:
                self.learner_error = f"{type(exc).__name__}: {exc}"
            self.exit_code = 1
            self.stop()
            self.stop()
            self.queue.abandon()

    def _learn_until_drained(self) -> None:
        interval = self.config.serve.stats_interval_s
        last_published = 0.0
        self._replay_journal()
        while True:
            self._offer_backlog()
            batches = self.queue.take(self.config.serve.learn_batch, timeout=interval)
            if batches is None:
                break
            if batches:
                self._consume(batches, self._learn)
            else:
                for hook in self._idle_hooks:
                    self._run_idle_hook(hook)
                self.keeper.maybe_save()
            now = time.monotonic()
            if now - last_published >= interval:
                self._publish_stats()
                last_published = now
        for hook in self._learner_hooks:
            self._run_hook(hook, final=True)
        self.keeper.save()
        self._publish_stats()

    def _replay_journal(self) -> None:
        """The journaled pushes no checkpoint covers, under the configured overload policy."""
        realtime = self.config.serve.overload == "realtime"
        self.keeper.replay(self._learn, self.config.serve.learn_batch,
                           stopped=lambda: self.queue.abandoned,
                           offer=self._offer if realtime else None,
                           keep_samples=self.lag_samples())

    def _consume(self, batches: list[Batch], how: Callable[[list[Batch]], None]) -> None:
        """Learn or offer `batches`, then mark them consumed (checkpoint record, queue room)."""
        how(batches)
        self.keeper.learned(batches)
        self.queue.done(batches)
        self.keeper.maybe_save()

    def lag_samples(self) -> int:
        """serve.max_lag_s of learning, in samples, at the measured rate (before the first
        step is timed, at an assumed FIRST_STEP_S per step)."""
        serve = self.config.serve
        rate = self.learn_rate or serve.learn_batch / FIRST_STEP_S
        return max(serve.learn_batch, int(min(serve.max_lag_s * rate, 2**62)))

    def _offer_backlog(self) -> None:
        """The real-time policy: pushes further behind than max_lag_s of learning go to the
        replay buffer only, so the learner trains on the recent stream (docs/overload.md)."""
        if self.config.serve.overload != "realtime":
            return
        behind = self.queue.take_behind(self.lag_samples())
        if behind:
            self._consume(behind, self._offer)

    def _offer(self, batches: list[Batch]) -> None:
        x, labels = _joined(batches)
        try:
            self.learner.offer_many(x, labels)
            failed = 0
        except Exception as exc:  # contained like a failed learn step
            log.exception("offering %d samples to the replay buffer failed", len(labels))
            failed = len(labels)
            with self._stats_lock:
                self.learner_error = f"{type(exc).__name__}: {exc}"
        self.counts.consumed(offered=len(labels) - failed, failed=failed)

    def _learn(self, batches: list[Batch]) -> None:
        """One learn_many call (one optimizer step) per `learn_batch` samples: small pushes are
        merged, large ones split, so the step size does not depend on how sensors batch."""
        self.current_batches = batches
        x, labels = _joined(batches)
        size = self.config.serve.learn_batch
        for start in range(0, len(labels), size):
            started = time.perf_counter()
            chunk_labels = labels[start:start + size]
            n = len(chunk_labels)
            try:
                self.learner.learn_many(x[start:start + size], chunk_labels)
                failed = 0
            except Exception as exc:  # a learner fault must not kill the daemon; it is logged
                log.exception("learner failed on %d samples", n)
                failed = n
                with self._stats_lock:
                    self.learner_error = f"{type(exc).__name__}: {exc}"
            self.counts.consumed(learned=n - failed, failed=failed)
            for hook in self._learner_hooks:
                self._run_hook(hook, final=False)
            self._note_step(time.perf_counter() - started)

    def _note_step(self, seconds: float) -> None:
        """What the learner can train: learn_batch samples per step at the moving average of
        its step time (hooks included). A step on a part-filled batch costs about as much as
        on a full one, so samples/s measured on a thin stream would understate it. Under
        backpressure it bounds the queue to max_lag_s of learning."""
        self._step_s = seconds if self._step_s is None else 0.8 * self._step_s + 0.2 * seconds
        self.learn_rate = self.config.serve.learn_batch / max(self._step_s, 1e-6)
        if self.config.serve.overload == "backpressure":
            self.queue.limit_samples = self.lag_samples()

    def _run_hook(self, hook: LearnerHook, final: bool) -> None:
        try:
            hook(self.learner, self.samples_learned, final)
        except Exception:
            log.exception("learner hook %r failed", hook)

    def _run_idle_hook(self, hook) -> None:
        try:
            hook(self.learner, self.samples_learned)
        except Exception:
            log.exception("idle hook %r failed", hook)

    def _publish_stats(self) -> None:
        try:
            stats = self.learner.stats()
        except Exception:
            log.exception("learner.stats() failed")
            return
        with self._stats_lock:
            self._learner_stats = stats


def _joined(batches: list[Batch]) -> tuple[np.ndarray, list]:
    """The samples and labels of `batches` as one array and one list (no copy for one)."""
    if len(batches) == 1:
        return batches[0].x, batches[0].labels
    return (np.concatenate([b.x for b in batches]),
            [label for b in batches for label in b.labels])
