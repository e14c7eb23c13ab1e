"""EWC++ / online EWC (Chaudhry et al. 2018, Schwarz et al. 2018)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from edgecl.learn.terms.base import Step
from edgecl.learn.terms.importance import ImportancePenalty, per_sample_mean


def _log_likelihood(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(logits.unsqueeze(0), y.unsqueeze(0))


def per_sample_fisher(model: torch.nn.Module, x: torch.Tensor,
                      y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher `mean_i (d log p(y_i|x_i) / d theta)^2`, one gradient per
    sample (not the square of the mini-batch gradient, which underestimates it).
    Computed with the model in eval mode, as it predicts: dropout off, BatchNorm on its
    running statistics, so one sample's gradient does not depend on the others."""
    return per_sample_mean(model, _log_likelihood, x, y, torch.square)


class EWCPP(ImportancePenalty):
    """EWC++: penalty `sum_i (1/2) * min(lambda * F_i, 1/lr) * (theta_i - theta*_i)^2`.

    The Fisher is a running estimate, `F <- alpha * F_batch + (1 - alpha) * F`, updated every
    `fisher_every` steps (with `fisher_per_batch`: every `fisher_every` stream batches, on
    the batch's first step) from a per-sample Fisher of the incoming stream batch (alpha is
    the weight of the new estimate, RWalk's convention). The anchor theta* is refreshed at each
    consolidation point: when a label never seen before arrives (before it is learned), and
    at the latest every `consolidate_every` learner steps. Task-free: no task boundary needed.
    The cap 1/lr on the stiffness keeps SGD stable where the Fisher is large (the stem
    layers on MNIST): without it a large lambda diverged to NaN.
    Memory: two float32 vectors (Fisher, anchor) of the student's size.
    """

    name = "ewcpp"
    describe = "EWC++: running per-sample Fisher, quadratic pull toward the last anchor"
    defaults = {"lam": 1.0, "alpha": 0.9, "fisher_every": 10, "fisher_per_batch": False}
    memory_note = "2 floats per parameter (running Fisher, anchor)"
    importance_store = "fisher"
    zero_padded = ("fisher",)

    analytic_penalty = True  # RWalk, built on this class, keeps the penalty in the loss

    def loss(self, step: Step):
        """None: the penalty's gradient goes straight to .grad in `after_backward` (exactly
        the gradient of `penalty()`), so the step's reported loss leaves it out."""
        return None if self.analytic_penalty else super().loss(step)

    def after_backward(self, step: Step) -> None:
        if self.analytic_penalty:
            self.add_penalty_gradient()
        if not self._fisher_due(step):
            return
        rows = step.parts["stream"].rows
        batch = per_sample_fisher(self.learner.student, step.x[rows].detach(), step.y[rows])
        for name, f_new in batch.items():
            old = self.fisher.get(name)
            self.fisher[name] = f_new if old is None else self.alpha * f_new + (1 - self.alpha) * old

    def _fisher_due(self, step: Step) -> bool:
        """Every `fisher_every` steps; with `fisher_per_batch`, every `fisher_every` stream
        batches, on a batch's first step: its later steps (`iterations`) see the same
        samples, whose Fisher barely differs, at the price of a per-sample backward."""
        if not self.fisher_per_batch:
            return step.index % self.fisher_every == 0
        batch = step.index // self.learner.config.iterations
        return step.repeat == 0 and batch % self.fisher_every == 0

    def consolidate(self) -> None:
        self.set_anchor()
