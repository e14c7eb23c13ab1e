"""Experience Replay (ER)."""
from __future__ import annotations

import torch.nn.functional as F

from edgecl.learn.terms.base import Step, Term


class ER(Term):
    """ER: `CE(f(x_M), y_M)` on a reservoir draw, learned in the same forward as the stream."""

    name = "er"
    describe = "experience replay: cross-entropy on a reservoir draw"
    defaults = {"weight": 1.0, "draw": 10}

    def prepare(self, step: Step, rng) -> None:
        self.learner.draw_replay(step, "er", self.draw)

    def loss(self, step: Step):
        if not step.has("er"):
            return None
        return self.weight * F.cross_entropy(step.class_logits_of("er"), step.labels_of("er"))
