"""Replay buffer: raw inputs, labels, and the logits seen at insertion; filled by reservoir
sampling, or class-balanced reservoir sampling (CBRS)."""
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

    def __init__(self, capacity: int, rng: np.random.Generator, balanced: bool = False):
        self.capacity = int(capacity)
        self.rng = rng
        self.balanced = balanced
        self.class_seen = np.zeros(0, dtype=np.int64)  # stream samples per class (CBRS)
        self.full_classes = np.zeros(0, dtype=bool)     # classes that were ever the largest
        self.seen = 0
        self.x: np.ndarray | None = None
        self.y = np.zeros(self.capacity, dtype=np.int64)
        self.logits = np.zeros((self.capacity, 0), dtype=np.float32)
        self.logit_width = np.zeros(self.capacity, dtype=np.int64)
        self.filled = 0

    def __len__(self) -> int:
        return self.filled

    def balanced_slots_for(self, y: np.ndarray) -> np.ndarray:
        """Class-balanced reservoir sampling (Chrysakis & Moens, ICML 2020). Once the buffer
        is full, a sample of a class that never was the largest in the buffer takes the slot
        of a random sample of the largest class; a sample of a class that was is kept with
        probability (its class's slots) / (its class's stream samples), in a slot of its own
        class. A rare class keeps its samples however skewed the stream; on a balanced
        stream this is reservoir sampling per class. Slot per sample, -1 if dropped."""
        grow = int(y.max()) + 1 - len(self.class_seen)
        if grow > 0:
            self.class_seen = np.concatenate([self.class_seen, np.zeros(grow, np.int64)])
            self.full_classes = np.concatenate([self.full_classes, np.zeros(grow, bool)])
        slots = np.full(len(y), -1, dtype=np.int64)
        for i, c in enumerate(y.tolist()):
            self.class_seen[c] += 1
            self.seen += 1
            if self.filled < self.capacity:
                slots[i] = self.filled
                self.filled += 1
                self.y[slots[i]] = c
                continue
            counts = np.bincount(self.y[:self.filled], minlength=len(self.class_seen))
            largest = counts == counts.max()
            self.full_classes |= largest
            if not self.full_classes[c]:
                victims = np.flatnonzero(largest[self.y[:self.filled]])
            elif self.rng.random() < counts[c] / self.class_seen[c]:
                victims = np.flatnonzero(self.y[:self.filled] == c)
            else:
                continue
            slots[i] = victims[int(self.rng.integers(len(victims)))]
            self.y[slots[i]] = c
        return slots

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

    def add(self, x: np.ndarray, y: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """Offer a batch to the reservoir. x: (N, C, H, W) raw, y: (N,), logits: (N, K).
        Returns the slot each sample took, -1 where it was dropped."""
        slots = self.admit(y)
        keep = slots >= 0
        if keep.any():
            self.store(slots[keep], x[keep], y[keep], logits[keep])
        return slots

    def admit(self, y: np.ndarray) -> np.ndarray:
        """Advance the reservoir over the stream samples labelled `y`: the slot each one
        takes, -1 if it is dropped. Then `store` what was admitted; deciding first lets a
        caller compute logits for the admitted few only."""
        if self.capacity <= 0:
            self.seen += len(y)
            return np.full(len(y), -1, dtype=np.int64)
        return self.balanced_slots_for(y) if self.balanced else self.slots_for(len(y))

    def store(self, idx: np.ndarray, x: np.ndarray, y: np.ndarray,
              logits: np.ndarray) -> None:
        """Write admitted samples into their slots. `logits` may have width 0: such a
        sample has no stored logits, and DER's logit term skips it (masked_logit_mse)."""
        if self.x is None:
            self.x = np.zeros((self.capacity, *x.shape[1:]), dtype=x.dtype)
        width = logits.shape[1]
        self.widen_logits(width)
        self.x[idx] = x
        self.y[idx] = y
        self.logits[idx] = 0.0
        self.logits[idx, :width] = logits
        self.logit_width[idx] = width
        self.filled = min(self.capacity, self.seen)

    def widen_logits(self, width: int) -> None:
        """Room for `width` stored logits per slot (new columns are zeros; each slot's
        `logit_width` still says how many of its columns are real)."""
        if width > self.logits.shape[1]:
            grown = np.zeros((self.capacity, width), dtype=np.float32)
            grown[:, : self.logits.shape[1]] = self.logits
            self.logits = grown

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
                "logit_width": torch.from_numpy(self.logit_width.copy()),
                "class_seen": torch.from_numpy(self.class_seen.copy()),
                "full_classes": torch.from_numpy(self.full_classes.copy())}

    def load_state_dict(self, state: dict) -> None:
        self.capacity = int(state["capacity"])
        self.seen = int(state["seen"])
        self.filled = int(state["filled"])
        self.x = None if state["x"] is None else state["x"].numpy().copy()
        self.y = state["y"].numpy().copy()
        self.logits = state["logits"].numpy().copy()
        self.logit_width = state["logit_width"].numpy().copy()
        # checkpoints written before CBRS existed have no class counts: start them empty
        empty = {"class_seen": torch.zeros(0, dtype=torch.int64),
                 "full_classes": torch.zeros(0, dtype=torch.bool)}
        self.class_seen = state.get("class_seen", empty["class_seen"]).numpy().copy()
        self.full_classes = state.get("full_classes", empty["full_classes"]).numpy().copy()
