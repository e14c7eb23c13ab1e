"""Learning without Forgetting (Li & Hoiem 2016), with the lecture's class-balanced weight."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from edgecl.learn.terms.base import Step
from edgecl.learn.terms.distill import DistillTerm


def lwf_old_loss(current: torch.Tensor, old: torch.Tensor, temperature: float) -> torch.Tensor:
    """`-mean_i sum_o y'_o log yhat'_o` over the K_old old-class outputs, where
    `y'_o = y_o^(1/T) / sum_j y_j^(1/T)` with y the old model's probabilities (equal to
    softmax(z_old / T)) and yhat' the same transform of the current model's probabilities
    over the same K_old outputs."""
    k = old.shape[1]
    target = F.softmax(old / temperature, dim=1)
    log_pred = F.log_softmax(current[:, :k] / temperature, dim=1)
    return -(target * log_pred).sum(dim=1).mean()


def balance_weight(old_classes: int, all_classes: int) -> float:
    """The lecture's class-balanced lambda = |Y_old| / |Y_all|: the share of old classes."""
    return old_classes / all_classes if all_classes else 0.0


class LwF(DistillTerm):
    """LwF: `weight * L_old` with `L_old = lwf_old_loss(f(x), f*(x), T)` over the whole
    step batch (stream and any replay draws), f* the anchor: the student frozen at the last
    consolidation point. The old classes are the anchor's outputs, K_old = its head width.

    `balanced = true`: `L = lambda * weight * L_old + (1 - lambda) * L_new` with
    lambda = K_old / K_all. The learner always adds L_new = CE(stream); this term adds
    `lambda * (weight * L_old - L_new)`, which rescales it to (1 - lambda).

    Task boundaries: the paper records the old model's responses before each new task. Here
    the anchor is taken at each consolidation point (a new class arrives, or every
    `consolidate_every` steps) and answers on every step batch after it, so its responses
    are recorded on the data as it streams in, one no-grad forward per step.
    """

    name = "lwf"
    describe = "learning without forgetting: the anchor's softened old-class outputs as targets"
    defaults = {"weight": 1.0, "temperature": 2.0, "balanced": False}

    def loss(self, step: Step):
        ref = self.reference(step)
        if ref is None or ref[0].shape[1] == 0:
            return None
        old_logits = ref[0]
        old = lwf_old_loss(step.logits, old_logits, self.temperature)
        if not self.balanced:
            return self.weight * old
        lam = balance_weight(old_logits.shape[1], step.num_classes)
        new = F.cross_entropy(step.logits_of("stream"), step.labels_of("stream"))
        return lam * (self.weight * old - new)
