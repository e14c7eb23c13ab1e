"""DER++, Buzzega et al. 2020."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from edgecl.learn.terms.base import Step
from edgecl.learn.terms.der import DER, masked_logit_mse


class DERPP(DER):
    """DER++: `alpha * mean ||z' - f(x')||^2 + beta * CE(f(x''), y'')`.

    With `shared_draw` (the default) one augmented reservoir draw serves both terms, x'' = x':
    a step trains on 2 x `draw` images instead of 3 x `draw` (stream batch of `draw`), and
    each buffered sample is rehearsed with its label and its logits at once. Without it,
    (x', z') and (x'', y'') are two independent draws, as in the paper. The logit term
    compares only the classes that existed when z' was stored.

    `correct_only`: the logit term skips samples whose stored logits got their own label
    wrong. A student trained from scratch stores a new class's first samples with logits
    from before it knew the class; matching them would rehearse the mistake, while the
    label term still replays those samples.
    """

    name = "derpp"
    describe = "DER++: stored-logit matching plus cross-entropy on replayed labels"
    defaults = {"alpha": 0.3, "beta": 0.8, "draw": 10, "shared_draw": True,
                "correct_only": False}

    def prepare(self, step: Step, rng) -> None:
        self.learner.draw_replay(step, "der", self.draw)
        if not self.shared_draw:
            self.learner.draw_replay(step, "derpp", self.draw)

    def loss(self, step: Step):
        if not step.has("der"):
            return None
        der = step.parts["der"]
        width = der.stored_width
        if self.correct_only:
            width = torch.where(_stored_right(der.stored_logits, width, step.labels_of("der")),
                                width, torch.zeros_like(width))
        logit_term = masked_logit_mse(step.logits_of("der"), der.stored_logits, width)
        labelled = "der" if self.shared_draw else "derpp"
        label_term = F.cross_entropy(step.class_logits_of(labelled), step.labels_of(labelled))
        return self.alpha * logit_term + self.beta * label_term


def _stored_right(stored: torch.Tensor, width: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Whether each stored row's argmax, over the classes it had, is its own label."""
    if stored.shape[1] == 0:  # offered without logits (offer_logits = "none")
        return torch.zeros(len(labels), dtype=torch.bool)
    cols = torch.arange(stored.shape[1])
    masked = stored.masked_fill(cols[None, :] >= width[:, None], float("-inf"))
    return (labels < width) & (masked.argmax(dim=1) == labels)
