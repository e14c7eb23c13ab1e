"""DER++, Buzzega et al. 2020."""
from __future__ import annotations

import torch.nn.functional as F

from edgecl.learn.terms.base import Step
from edgecl.learn.terms.der import DER, masked_logit_mse


class DERPP(DER):
    """DER++: `alpha * mean ||z' - f(x')||^2 + beta * CE(f(x''), y'')`.

    (x', z') and (x'', y'') are two independent reservoir draws, both augmented on draw.
    The logit term compares only the classes that existed when z' was stored.
    """

    name = "derpp"
    describe = "DER++: stored-logit matching plus cross-entropy on a second, independent draw"
    defaults = {"alpha": 0.3, "beta": 0.8, "draw": 10}

    def prepare(self, step: Step, rng) -> None:
        self.learner.draw_replay(step, "der", self.draw)
        self.learner.draw_replay(step, "derpp", self.draw)

    def loss(self, step: Step):
        if not step.has("der"):
            return None
        der = step.parts["der"]
        logit_term = masked_logit_mse(step.logits_of("der"), der.stored_logits, der.stored_width)
        label_term = F.cross_entropy(step.logits_of("derpp"), step.labels_of("derpp"))
        return self.alpha * logit_term + self.beta * label_term
