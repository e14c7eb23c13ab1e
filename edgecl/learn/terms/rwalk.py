"""Riemannian Walk (RWalk), Chaudhry et al. 2018."""
from __future__ import annotations

import torch

from edgecl.learn.terms.base import Step
from edgecl.learn.terms.ewcpp import EWCPP
from edgecl.learn.terms.importance import FollowsPath


class RWalk(FollowsPath, EWCPP):
    """RWalk: penalty `sum_i (1/2) * min(lam * Omega_i, 1/lr) * (theta_i - theta*_i)^2` with
    `Omega = F / max F + relu(S) / max relu(S)` (maxima over all parameters).

    F is EWC++'s running per-sample Fisher (`EWCPP`: `F <- alpha * F_batch + (1 - alpha) * F`
    every `fisher_every` steps). S is the path score: SI's path integral
    `omega += -g * delta_theta` along the trajectory (`PathIntegral`, g without RWalk's own
    penalty, as in SI), and at a consolidation point
    `s = omega / ((1/2) * F * (theta - theta*)^2 + eps)`, `S <- (S + s) / 2` (the first s is
    taken whole), omega reset, theta* = theta. Normalizing both parts by their maximum makes
    lam comparable across the two scales (the paper's point: less sensitive to lam). The
    maximum is an outlier far above the typical parameter's, so lam is large (1000: on
    Split-MNIST at buffer 0, seed 0, Task-IL rose 74.0 / 76.9 / 85.0 / 88.1 % for lam 1, 10,
    100, 1000; the stiffness cap 1/lr still bounds every parameter).

    Task boundaries: the paper scores a task's path when it ends; edgecl does it at each
    consolidation point (a never-seen label arrives, or every `consolidate_every` steps),
    with delta_theta the movement since the previous point (as FACIL's implementation:
    per-step movements are so small that `omega / (F * delta^2)` becomes ~2 / (lr * F)).
    The penalty starts at the first consolidation point.
    Memory: 6 float32 vectors of the student's size (F, S, theta*, omega, and theta and g of
    the last step).
    """

    name = "rwalk"
    describe = "RWalk: EWC++ Fisher plus an SI-style path score, each normalized by its max"
    defaults = {"lam": 1000.0, "alpha": 0.9, "fisher_every": 10, "fisher_per_batch": False,
                "eps": 0.1}
    memory_note = "6 floats per parameter (Fisher, score, anchor, omega, last theta, last g)"
    zero_padded = ("fisher", "score")
    vectors = 6

    def omega(self) -> dict[str, torch.Tensor]:
        if not self.score or not self.fisher:
            return {}
        f_max = max(float(f.max()) for f in self.fisher.values()) or 1.0
        s_max = max(float(s.clamp_min(0).max()) for s in self.score.values()) or 1.0
        return {name: self.fisher[name] / f_max + self.score[name].clamp_min(0) / s_max
                for name in self.fisher}

    analytic_penalty = False  # its path integral reads whether the loss held the penalty

    def after_backward(self, step: Step) -> None:
        self.record_path(step)  # first: this step's penalty used the Fisher before the update
        super().after_backward(step)

    def consolidate(self) -> None:
        params = self._params()
        self.path.flush(params)
        omega = self.path.take()
        for name, w in omega.items():
            moved = params[name].detach() - self.anchor[name]
            s = w / (0.5 * self.fisher[name] * moved.pow(2) + self.eps)
            old = self.score.get(name)
            self.score[name] = s if old is None else 0.5 * (old + s)
        self.set_anchor()
