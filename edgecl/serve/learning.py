"""What the daemon needs of a learner, as types: the serve side's contract with edgecl.learn
(OnlineLearner is one such learner; tests and benchmarks pass lighter ones, e.g.
tests/load_sensors.py's RecordingLearner). Only the learner thread calls these methods.
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable


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
class HasSettings(Protocol):
    """A learner whose settings a restored checkpoint's can be compared with."""

    config: Any
