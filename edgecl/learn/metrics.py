"""Prequential accuracy (test-then-train) and the continual-learning summary figures."""
from __future__ import annotations

from collections import deque

import numpy as np


class PrequentialAccuracy:
    """Accuracy of predictions made before each sample was learned: overall, over the last
    `window` samples, and per true class."""

    def __init__(self, window: int = 1000):
        self.window = window
        self.total = 0
        self.correct = 0
        self.recent: deque[int] = deque(maxlen=window)
        self.per_class: dict[int, list[int]] = {}  # class index -> [correct, total]

    def update(self, y_true: np.ndarray, y_pred: np.ndarray) -> int:
        hits = (np.asarray(y_true) == np.asarray(y_pred)).astype(int)
        self.total += len(hits)
        self.correct += int(hits.sum())
        self.recent.extend(hits.tolist())
        for cls, hit in zip(np.asarray(y_true).tolist(), hits.tolist()):
            counts = self.per_class.setdefault(int(cls), [0, 0])
            counts[0] += hit
            counts[1] += 1
        return int(hits.sum())

    @property
    def overall(self) -> float:
        return self.correct / self.total if self.total else 0.0

    @property
    def recent_acc(self) -> float:
        return sum(self.recent) / len(self.recent) if self.recent else 0.0

    def state_dict(self) -> dict:
        return {"window": self.window, "total": self.total, "correct": self.correct,
                "recent": list(self.recent), "per_class": {k: list(v) for k, v in self.per_class.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.window = state["window"]
        self.total = state["total"]
        self.correct = state["correct"]
        self.recent = deque(state["recent"], maxlen=self.window)
        self.per_class = {int(k): list(v) for k, v in state["per_class"].items()}


def average_forgetting(acc_matrix: np.ndarray) -> float:
    """Chaudhry et al.'s forgetting: for each task but the last, the best accuracy it ever had
    minus its final accuracy, averaged. acc_matrix[i, j] = accuracy on task j after task i."""
    a = np.asarray(acc_matrix, dtype=float)
    t = a.shape[0]
    if t < 2:
        return 0.0
    drops = [a[: t - 1, j].max() - a[t - 1, j] for j in range(t - 1)]
    return float(np.mean(drops))
