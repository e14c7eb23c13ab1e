"""What the distillation terms share: a reference model to compare the student with.

The reference is the anchor (a frozen copy of the student taken at each consolidation point;
`edgecl.models.frozen_copy`) or, for terms that offer `source = "teacher"`, the ResNet
teacher. A term names the taps it compares (`edgecl.models.EdgeNet.tap_names()`); the
learner computes them on the student and on the reference in the same step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from edgecl.learn.terms.base import Step, Term
from edgecl.models import model_bytes


class DistillTerm(Term):
    """Base of the terms that read a reference model. Subclasses set `tap_params`: the
    parameters holding tap names (a name, or comma-separated names); their union becomes
    `taps`, asked of the student and of the reference."""

    tap_params: tuple[str, ...] = ()
    memory_note = "a frozen anchor copy of the student (shared by every anchor-based term)"

    def __init__(self, learner, **params):
        super().__init__(learner, **params)
        names = [n for key in self.tap_params for n in tap_list(getattr(self, key))]
        self.taps = tuple(dict.fromkeys(names))
        if getattr(self, "source", "anchor") == "teacher":
            self.teacher_taps = self.taps
        else:
            self.needs_anchor = True

    def reference(self, step: Step) -> tuple[torch.Tensor, dict] | None:
        """(logits, features) of the reference model on the step batch; None before the
        first consolidation point (no anchor yet) or without a teacher."""
        if getattr(self, "source", "anchor") == "teacher":
            if step.teacher_logits is None:
                return None
            return step.teacher_logits, step.teacher_features
        if step.anchor_logits is None:
            return None
        return step.anchor_logits, step.anchor_features

    @classmethod
    def memory_bytes(cls, student, input_shape, params) -> int:
        if params.get("source", "anchor") == "teacher":
            return 0  # the teacher is counted once, by the teacher setting
        return model_bytes(student)


class ExemplarTerm(DistillTerm):
    """A distillation term on buffer exemplars: once an anchor exists it draws `draw`
    samples of its own (named after the term), or with `draw = 0` reads the other terms'
    replay draws. Subclasses set `draw` and `tap` defaults."""

    tap_params = ("tap",)

    def prepare(self, step: Step, rng) -> None:
        if self.learner.anchor is not None:
            self.learner.draw_replay(step, self.name, self.draw)

    def exemplars(self, step: Step):
        """(current features, anchor features, labels) of the exemplars, one row each; None
        before the first consolidation point or without exemplars."""
        ref = self.reference(step)
        rows = exemplar_rows(step, self.name)
        if ref is None or rows is None:
            return None
        return flat(step.features[self.tap][rows]), flat(ref[1][self.tap][rows]), step.y[rows]


def exemplar_rows(step: Step, own: str) -> slice | None:
    """Rows of buffer exemplars in the step: the term's own draw `own` if it made one, else
    every replay draw other terms made (with `draw = 0`: no extra samples in the forward)."""
    if step.has(own):
        return step.parts[own].rows
    start = step.parts["stream"].rows.stop
    return slice(start, len(step.y)) if start < len(step.y) else None


def tap_list(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def as_maps(h: torch.Tensor) -> torch.Tensor:
    """A (B, C) embedding as a (B, C, 1, 1) map, so map-based terms accept every tap."""
    return h if h.dim() == 4 else h[:, :, None, None]


def match_spatial(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger of two (B, C, H, W) maps to the other's H x W: the student's
    and the teacher's stages need not have the same resolution."""
    if a.shape[-2:] == b.shape[-2:]:
        return a, b
    if a.shape[-2] * a.shape[-1] > b.shape[-2] * b.shape[-1]:
        return F.adaptive_avg_pool2d(a, b.shape[-2:]), b
    return a, F.adaptive_avg_pool2d(b, a.shape[-2:])


def flat(h: torch.Tensor) -> torch.Tensor:
    """One row per sample: maps are flattened over C x H x W."""
    return h.reshape(h.shape[0], -1)


def tap_channels(model, input_shape: tuple[int, int, int], tap: str) -> int:
    """Channels of a tap, found by one forward pass on a zero input of `input_shape`."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _, maps = model(torch.zeros(1, *input_shape), (tap,))
    finally:
        model.train(was_training)
    return maps[tap].shape[1]
