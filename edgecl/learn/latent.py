"""Latent replay (Pellegrini et al., "Latent Replay for Real-Time Continual Learning", IROS
2020): after a warm-up, the student's first body layers are frozen, and the replay buffer
keeps each sample's output of those layers (its latent) beside its raw bytes. A replayed
sample then enters the network at the first trainable layer, skipping the frozen part
forward and backward, and the stream batch runs that part once per batch, without a
gradient, however many iterations learn it.

The frozen layers run in eval mode (their BatchNorm statistics are frozen too), so a latent
is a fixed function of the raw input: latents are never checkpointed, they are recomputed
from the buffer's raw inputs when a checkpoint is loaded. The raw inputs stay in the buffer
because the int8 export calibrates on them. The exported model is the whole student, frozen
part included: nothing changes for devices.
"""
from __future__ import annotations

import numpy as np
import torch


class LatentReplay:
    """Owns the frozen prefix of the student's body and the buffer's latents, per slot."""

    def __init__(self, layers: int, after: int):
        self.layers = layers  # body layers frozen (0: latent replay off)
        self.after = after    # samples learned before the prefix freezes
        self.frozen = False
        self.latents: np.ndarray | None = None  # (capacity, C, H, W) float16

    @property
    def enabled(self) -> bool:
        return self.layers > 0

    def check(self, student) -> None:
        """The frozen part must leave trainable layers before the pooling (the body ends in
        pool and flatten)."""
        trainable = len(student.body) - 2
        if self.layers >= trainable:
            raise ValueError(f"latent_layers {self.layers} would freeze the whole body: the "
                             f"student has {trainable} layers before pooling")

    def due(self, samples_learned: int) -> bool:
        return self.enabled and not self.frozen and samples_learned >= self.after

    def freeze(self, student, buffer, to_tensor) -> None:
        """Stop training the prefix and compute the latent of every buffered sample."""
        for p in student.body[:self.layers].parameters():
            p.requires_grad_(False)
            p.grad = None
        self.frozen = True
        self.latents = None
        n = len(buffer)
        if n:
            self.store(buffer.capacity, np.arange(n), self.prefix(student, to_tensor(buffer.x[:n])))

    @torch.no_grad()
    def prefix(self, student, x: torch.Tensor) -> torch.Tensor:
        """The latent of raw (scaled) inputs: the frozen layers in eval mode."""
        front = student.body[:self.layers]
        front.eval()
        return front(student.normalize(x))

    def suffix(self, student, z: torch.Tensor) -> torch.Tensor:
        """Logits from latents: the trainable layers, the dropout and the head."""
        return student.head(student.dropout(student.body[self.layers:](z)))

    def train(self, student) -> None:
        """Train mode for the student, eval mode for its frozen layers."""
        student.train()
        if self.frozen:
            student.body[:self.layers].eval()

    def store(self, capacity: int, slots: np.ndarray, z: torch.Tensor) -> None:
        if self.latents is None:
            self.latents = np.zeros((capacity, *z.shape[1:]), dtype=np.float16)
        self.latents[slots] = z.numpy().astype(np.float16)

    def get(self, slots: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.latents[slots].astype(np.float32))

    def nbytes(self) -> int:
        return 0 if self.latents is None else self.latents.nbytes

    def state_dict(self) -> dict:
        return {"frozen": self.frozen}
