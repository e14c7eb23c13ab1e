"""EWC++ / online EWC (Chaudhry et al. 2018, Schwarz et al. 2018)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from edgecl.learn.terms.base import Step, Term


def per_sample_fisher(model: torch.nn.Module, x: torch.Tensor,
                      y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher `mean_i (d log p(y_i|x_i) / d theta)^2`, one gradient per
    sample (not the square of the mini-batch gradient, which underestimates it).
    Computed with the model in eval mode, as it predicts: dropout off, BatchNorm on its
    running statistics, so one sample's gradient does not depend on the others."""
    was_training = model.training
    model.eval()
    try:
        params = {k: v.detach() for k, v in model.named_parameters()}
        buffers = {k: v.detach() for k, v in model.named_buffers()}

        def log_lik(p, xi, yi):
            logits = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
            return -F.cross_entropy(logits, yi.unsqueeze(0))

        grads = vmap(grad(log_lik), in_dims=(None, 0, 0))(params, x, y)
        return {k: g.pow(2).mean(dim=0) for k, g in grads.items()}
    finally:
        model.train(was_training)


class EWCPP(Term):
    """EWC++: penalty `sum_i (1/2) * min(lambda * F_i, 1/lr) * (theta_i - theta*_i)^2`.

    The Fisher is a running estimate, `F <- alpha * F_batch + (1 - alpha) * F`, updated every
    `fisher_every` steps from a per-sample Fisher of the incoming stream batch (alpha is the
    weight of the new estimate, RWalk's convention). The anchor theta* is refreshed at each
    consolidation point: when a label never seen before arrives (before it is learned), and
    at the latest every `consolidate_every` learner steps. Task-free: no task boundary needed.
    The cap 1/lr on the stiffness keeps SGD stable where the Fisher is large (the stem
    layers on MNIST): without it a large lambda diverged to NaN.
    Memory: two float32 vectors (Fisher, anchor) of the student's size.
    """

    name = "ewcpp"
    describe = "EWC++: running per-sample Fisher, quadratic pull toward the last anchor"
    defaults = {"lam": 1.0, "alpha": 0.9, "fisher_every": 10}

    def __init__(self, learner, **params):
        super().__init__(learner, **params)
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    def _params(self):
        return dict(self.learner.student.named_parameters())

    def loss(self, step: Step):
        if not self.anchor or not self.fisher:
            return None
        total = 0.0
        for name, p in self._params().items():
            f = self.fisher.get(name)
            if f is None:
                continue
            stiffness = (self.lam * f).clamp(max=self.max_stiffness)
            total = total + (stiffness * (p - self.anchor[name]).pow(2)).sum()
        return 0.5 * total

    @property
    def max_stiffness(self) -> float:
        """Cap on lambda*F so one SGD step on the penalty never overshoots the anchor
        (lr * lambda * F <= 1); past that the quadratic pull diverges instead of holding."""
        return 1.0 / self.learner.config.lr

    def after_backward(self, step: Step) -> None:
        if step.index % self.fisher_every:
            return
        rows = step.parts["stream"].rows
        batch = per_sample_fisher(self.learner.student, step.x[rows].detach(), step.y[rows])
        for name, f_new in batch.items():
            old = self.fisher.get(name)
            self.fisher[name] = f_new if old is None else self.alpha * f_new + (1 - self.alpha) * old

    def consolidate(self) -> None:
        self.anchor = {k: v.detach().clone() for k, v in self._params().items()}

    def on_grow(self, old_n: int, new_n: int) -> None:
        """Pad head rows: new classes start with zero importance, anchored at their init."""
        params = self._params()
        for store in (self.fisher, self.anchor):
            for name, value in list(store.items()):
                current = params[name]
                if value.shape != current.shape:
                    fill = torch.zeros_like(current) if store is self.fisher else current.detach().clone()
                    fill[: value.shape[0]] = value
                    store[name] = fill

    def extra_bytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for store in (self.fisher, self.anchor) for t in store.values())

    def state_dict(self) -> dict:
        return {"fisher": dict(self.fisher), "anchor": dict(self.anchor)}

    def load_state_dict(self, state: dict) -> None:
        self.fisher = {k: v.clone() for k, v in state["fisher"].items()}
        self.anchor = {k: v.clone() for k, v in state["anchor"].items()}
