"""Elastic Weight Consolidation (EWC), Kirkpatrick et al. 2017."""
from __future__ import annotations

from edgecl.learn.terms.ewcpp import per_sample_fisher
from edgecl.learn.terms.importance import WindowedImportance


class EWC(WindowedImportance):
    """EWC: penalty `sum_i (1/2) * min(lam * F_i, 1/lr) * (theta_i - theta*_i)^2`, with
    `F = mean_x (d log p(y|x) / d theta)^2` the diagonal Fisher, one gradient per sample
    (`per_sample_fisher`, true labels), computed once per consolidation point at the
    parameters of that point, which become the anchor theta*.

    Task boundaries: the paper computes F on a task's training data when it ends; edgecl
    does it at each consolidation point (a never-seen label arrives, or every
    `consolidate_every` steps) on the last `samples` stream samples (`WindowedImportance`).
    Several tasks: the paper keeps one (F, theta*) pair per task, memory growing with the
    tasks; edgecl keeps one, `F <- gamma * F + F_new` with theta* the newest point (online
    EWC, Schwarz et al. 2018; gamma 1 sums the Fishers).
    Memory: 2 float32 vectors of the student's size, plus the window.
    """

    name = "ewc"
    describe = "EWC: per-sample Fisher of recent data at each consolidation point"
    defaults = {"lam": 100.0, "gamma": 1.0, "samples": 200}
    memory_note = "2 floats per parameter (Fisher, anchor) + a window of `samples` inputs"
    importance_store = "fisher"
    zero_padded = ("fisher",)

    def estimate(self, x, y):
        return per_sample_fisher(self.learner.student, x, y)

    def merge(self, old, new):
        return self.gamma * old + new
