"""The held-out slice: stream samples the student never trains on, for the parity gate and the
accuracy figures in snapshot metadata.

Per class, every `every`-th sample is diverted (1 in 20 by default; the first samples of a
class always train). Diverted samples enter a per-class reservoir of `per_class` slots, so
the slice stays class-balanced and spread over the whole stream rather than its start.
Diverted samples that the reservoir drops are still never trained on: the decision to hold a
sample out is made before, and independently of, the reservoir.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


class HeldOutSlice:
    """Class-balanced, reservoir-sampled slice of the stream that is never learned from."""

    def __init__(self, every: int = 20, per_class: int = 20, seed: int = 0):
        if every < 2:
            raise ValueError(f"every={every}: at least 2, or nothing would be trained on")
        if per_class < 1:
            raise ValueError(f"per_class={per_class}: must be at least 1")
        self.every = int(every)
        self.per_class = int(per_class)
        self.rng = np.random.default_rng(seed)
        self.counts: dict = {}     # label -> stream samples of that class seen
        self.diverted: dict = {}   # label -> samples held out (offered to the reservoir)
        self.slots: dict = {}      # label -> np.ndarray (per_class, *sample_shape)
        self.filled: dict = {}     # label -> filled slots

    def __len__(self) -> int:
        return sum(self.filled.values())

    def offer(self, x: np.ndarray, labels: Sequence) -> np.ndarray:
        """Route a batch: returns a bool mask, True for samples kept back. The caller trains
        only on `x[~mask]`."""
        x = np.asarray(x)
        if len(x) != len(labels):
            raise ValueError(f"{len(x)} samples but {len(labels)} labels")
        mask = np.zeros(len(x), dtype=bool)
        for i, label in enumerate(labels):
            key = _key(label)
            n = self.counts.get(key, 0) + 1
            self.counts[key] = n
            if n % self.every == 0:
                mask[i] = True
                self._reservoir_add(key, x[i])
        return mask

    def _reservoir_add(self, key, sample: np.ndarray) -> None:
        if key not in self.slots:
            self.slots[key] = np.zeros((self.per_class, *sample.shape), dtype=sample.dtype)
            self.filled[key] = 0
            self.diverted[key] = 0
        seen = self.diverted[key]
        self.diverted[key] = seen + 1
        if seen < self.per_class:
            slot = seen
        else:
            slot = int(self.rng.integers(0, seen + 1))
            if slot >= self.per_class:
                return
        self.slots[key][slot] = sample
        self.filled[key] = min(self.per_class, seen + 1)

    def arrays(self) -> tuple[np.ndarray | None, list]:
        """All held-out samples (N, C, H, W) and their labels, classes in first-seen order.
        (None, []) while nothing is held out."""
        if not self.slots:
            return None, []
        xs, ys = [], []
        for key, slots in self.slots.items():
            n = self.filled[key]
            xs.append(slots[:n])
            ys.extend([key] * n)
        return np.concatenate(xs), ys

    def class_counts(self) -> dict:
        return dict(self.filled)

    def state_dict(self) -> dict:
        return {"every": self.every, "per_class": self.per_class,
                "rng": self.rng.bit_generator.state, "counts": list(self.counts.items()),
                "diverted": list(self.diverted.items()),
                "slots": [(k, v.copy(), self.filled[k]) for k, v in self.slots.items()]}

    def load_state_dict(self, state: dict) -> None:
        self.every, self.per_class = int(state["every"]), int(state["per_class"])
        self.rng.bit_generator.state = state["rng"]
        self.counts = dict(state["counts"])
        self.diverted = dict(state["diverted"])
        self.slots = {k: np.asarray(v) for k, v, _ in state["slots"]}
        self.filled = {k: int(n) for k, _, n in state["slots"]}


def _key(label):
    """Labels as dict keys: numpy scalars become Python ones so 3 and np.int64(3) match."""
    return label.item() if isinstance(label, np.generic) else label
