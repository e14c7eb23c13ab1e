"""Memory Aware Synapses (MAS), Aljundi et al. 2018."""
from __future__ import annotations

import torch

from edgecl.learn.terms.importance import WindowedImportance, per_sample_mean


def _squared_output_norm(logits: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
    return logits.pow(2).sum()


def mas_importance(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """`mean_x |d ||f(x)||_2^2 / d theta|`, one gradient per sample, in eval mode. Needs no
    labels: it measures how sensitive the learned function is to each parameter."""
    no_labels = torch.zeros(len(x), dtype=torch.long)
    return per_sample_mean(model, _squared_output_norm, x, no_labels, torch.abs)


class MAS(WindowedImportance):
    """MAS: penalty `sum_i (1/2) * min(lam * Omega_i, 1/lr) * (theta_i - theta*_i)^2`, with
    `Omega = mean_x |d ||f(x)||_2^2 / d theta|` (`mas_importance`, f the logits), merged
    across consolidation points as `Omega <- (Omega_old + Omega_new) / 2`.

    Task boundaries: the paper computes Omega on a task's data when it ends; edgecl does it
    at each consolidation point (a never-seen label arrives, or every `consolidate_every`
    steps) on the last `samples` stream inputs (`WindowedImportance`; labels unused), and
    sets theta* there.
    Memory: 2 float32 vectors of the student's size, plus the window.
    """

    name = "mas"
    describe = "MAS: output-norm sensitivity |d||f(x)||^2/dtheta| at each consolidation point"
    defaults = {"lam": 1.0, "samples": 200}
    memory_note = "2 floats per parameter (Omega, anchor) + a window of `samples` inputs"

    def estimate(self, x, y):
        return mas_importance(self.learner.student, x)

    def merge(self, old, new):
        return 0.5 * (old + new)
