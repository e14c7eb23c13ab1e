"""What a loss term is, and the step it sees.

A term is one class in one file. The learner builds one `Step` per incoming mini-batch:
terms first ask for replay draws (`prepare`), the learner runs ONE forward pass over the
stream batch and every draw together, then each term turns its slice of the logits into a
loss. Optional hooks: `after_backward` (gradients are present), `consolidate` (a
consolidation point: a new class arrived, or `consolidate_every` steps passed), `on_grow`
(the head gained classes), `state_dict` / `load_state_dict`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Part:
    """A contiguous slice of the step batch, with what the buffer stored for it."""
    rows: slice
    stored_logits: torch.Tensor | None = None  # (n, K_stored) for DER draws
    stored_width: torch.Tensor | None = None   # (n,) classes that existed at storage time


@dataclass
class Step:
    """One learning step: inputs of the stream batch plus replay draws, then their outputs."""
    x_parts: list[torch.Tensor] = field(default_factory=list)
    y_parts: list[torch.Tensor] = field(default_factory=list)
    parts: dict[str, Part] = field(default_factory=dict)
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    features: torch.Tensor | None = None
    teacher_logits: torch.Tensor | None = None
    num_classes: int = 0
    index: int = 0  # global step counter

    def add(self, name: str, x: torch.Tensor, y: torch.Tensor, **stored) -> None:
        start = sum(len(p) for p in self.x_parts)
        self.x_parts.append(x)
        self.y_parts.append(y)
        self.parts[name] = Part(slice(start, start + len(x)), **stored)

    def seal(self) -> None:
        self.x = torch.cat(self.x_parts)
        self.y = torch.cat(self.y_parts)

    def has(self, name: str) -> bool:
        return name in self.parts

    def logits_of(self, name: str) -> torch.Tensor:
        return self.logits[self.parts[name].rows]

    def labels_of(self, name: str) -> torch.Tensor:
        return self.y[self.parts[name].rows]


class Term:
    """Base class: a weighted loss term. Subclasses set `name` and `describe`."""

    name = "term"
    describe = ""
    defaults: dict = {}

    def __init__(self, learner, **params):
        self.learner = learner
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise ValueError(f"{self.name}: unknown parameter(s) {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(sorted(self.defaults)) or 'none'}")
        for key, value in {**self.defaults, **params}.items():
            setattr(self, key, value)

    def prepare(self, step: Step, rng: np.random.Generator) -> None:
        """Add replay draws to the step before the forward pass."""

    def loss(self, step: Step) -> torch.Tensor | None:
        return None

    def after_backward(self, step: Step) -> None:
        pass

    def consolidate(self) -> None:
        pass

    def on_grow(self, old_n: int, new_n: int) -> None:
        pass

    def extra_bytes(self) -> int:
        """Memory this term holds beyond the model and buffer (importance, anchors...)."""
        return 0

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
