"""Reservoir replay buffer: raw inputs, labels, and the logits seen at insertion."""
from __future__ import annotations

import numpy as np
import torch


class ReservoirBuffer:
    """Holds at most `capacity` samples; after n stream samples, each one is kept with
    probability capacity / n (Vitter's algorithm R).

    Inputs are stored as they arrived (uint8 bytes stay uint8: 4x smaller than float).
    Logits are stored at their width when inserted; `logit_width[i]` records how many
    classes existed then, so DER++ compares only those after the head has grown.
    """

    def __init__(self, capacity: int, rng: np.random.Generator):
        self.capacity = int(capacity)
        self.rng = rng
        self.seen = 0
        self.x: np.ndarray | None = None
        self.y = np.zeros(self.capacity, dtype=np.int64)
        self.logits = np.zeros((self.capacity, 0), dtype=np.float32)
        self.logit_width = np.zeros(self.capacity, dtype=np.int64)
        self.filled = 0

    def __len__(self) -> int:
        return self.filled

    def slots_for(self, n: int) -> np.ndarray:
        """Advance the reservoir over n new stream samples; slot per sample, -1 if dropped."""
        slots = np.full(n, -1, dtype=np.int64)
        for i in range(n):
            if self.seen < self.capacity:
                slots[i] = self.seen
            else:
                r = int(self.rng.integers(0, self.seen + 1))
                if r < self.capacity:
                    slots[i] = r
            self.seen += 1
        return slots

    def add(self, x: np.ndarray, y: np.ndarray, logits: np.ndarray) -> None:
        """Offer a batch to the reservoir. x: (N, C, H, W) raw, y: (N,), logits: (N, K)."""
        if self.capacity <= 0:
            self.seen += len(x)
            return
        slots = self.slots_for(len(x))
        keep = slots >= 0
        if not keep.any():
            return
        if self.x is None:
            self.x = np.zeros((self.capacity, *x.shape[1:]), dtype=x.dtype)
        width = logits.shape[1]
        if width > self.logits.shape[1]:
            grown = np.zeros((self.capacity, width), dtype=np.float32)
            grown[:, : self.logits.shape[1]] = self.logits
            self.logits = grown
        idx = slots[keep]
        self.x[idx] = x[keep]
        self.y[idx] = y[keep]
        self.logits[idx] = 0.0
        self.logits[idx, :width] = logits[keep]
        self.logit_width[idx] = width
        self.filled = min(self.capacity, self.seen)

    def sample_indices(self, n: int) -> np.ndarray:
        return self.rng.choice(self.filled, size=min(n, self.filled), replace=False)

    def get(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.x[idx], self.y[idx], self.logits[idx], self.logit_width[idx]

    def nbytes(self) -> int:
        """Bytes held by stored inputs, labels, logits and widths."""
        xb = 0 if self.x is None else self.x.nbytes
        return xb + self.y.nbytes + self.logits.nbytes + self.logit_width.nbytes

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "seen": self.seen, "filled": self.filled,
                "x": None if self.x is None else torch.from_numpy(self.x.copy()),
                "y": torch.from_numpy(self.y.copy()),
                "logits": torch.from_numpy(self.logits.copy()),
                "logit_width": torch.from_numpy(self.logit_width.copy())}

    def load_state_dict(self, state: dict) -> None:
        self.capacity = int(state["capacity"])
        self.seen = int(state["seen"])
        self.filled = int(state["filled"])
        self.x = None if state["x"] is None else state["x"].numpy().copy()
        self.y = state["y"].numpy().copy()
        self.logits = state["logits"].numpy().copy()
        self.logit_width = state["logit_width"].numpy().copy()
