"""Sliced Cramér Preservation (SCP), Kolouri et al. 2020."""
from __future__ import annotations

import numpy as np
import torch

from edgecl.learn.terms.importance import WindowedImportance

CHUNK = 16  # projections differentiated at once (each holds a gradient of the student's size)


def random_unit_vectors(rng: np.random.Generator, n: int, dim: int) -> torch.Tensor:
    """n directions uniform on the unit sphere of R^dim."""
    xi = torch.from_numpy(rng.standard_normal((n, dim))).float()
    return xi / xi.norm(dim=1, keepdim=True).clamp_min(1e-12)


def sliced_cramer_importance(model: torch.nn.Module, x: torch.Tensor,
                             xi: torch.Tensor) -> dict[str, torch.Tensor]:
    """`Gamma = (1/L) sum_l (d (z_mean . xi_l) / d theta)^2`, z_mean = mean_x f(x) (logits,
    eval mode), xi (L, K) unit vectors.

    With fewer classes K than slices L it differentiates the K outputs once (Jacobian J, K
    gradients) and uses `(xi_l . J)^2` summed over l = `J^T M J` per parameter,
    M = xi^T xi / L: the same value for K backward passes instead of L.
    """
    was_training = model.training
    model.eval()
    try:
        names, params = zip(*model.named_parameters())
        z_mean = model(x).mean(dim=0)
        n_slices, k = xi.shape
        rows = torch.eye(k) if k < n_slices else xi
        gamma = [torch.zeros_like(p) for p in params]
        grads = [[] for _ in params]
        for start in range(0, len(rows), CHUNK):
            part = torch.autograd.grad(z_mean, params, grad_outputs=rows[start:start + CHUNK],
                                       is_grads_batched=True, retain_graph=True)
            for i, g in enumerate(part):
                if k < n_slices:
                    grads[i].append(g)
                else:
                    gamma[i] += g.pow(2).sum(dim=0) / n_slices
        if k < n_slices:
            mix = xi.T @ xi / n_slices
            for i, parts in enumerate(grads):
                jac = torch.cat(parts).reshape(k, -1)
                gamma[i] = ((mix @ jac) * jac).sum(dim=0).reshape(params[i].shape)
        return {name: g.detach() for name, g in zip(names, gamma)}
    finally:
        model.train(was_training)


class SCP(WindowedImportance):
    """SCP: penalty `sum_i (1/2) * min(lam * Gamma_i, 1/lr) * (theta_i - theta*_i)^2`, with
    `Gamma = (1/L) sum_l (d (z_mean . xi_l) / d theta)^2`: z_mean the mean logits over recent
    inputs, xi_l L random unit vectors (`sliced_cramer_importance`), drawn from the learner's
    RNG at each point. Merged as `Gamma <- alpha * Gamma_old + (1 - alpha) * Gamma_new`
    (alpha is the weight of the OLD estimate here, as in the paper; the first estimate is
    taken whole).

    Task boundaries: the paper computes Gamma on a task's data when it ends; edgecl does it
    at each consolidation point (a never-seen label arrives, or every `consolidate_every`
    steps) on the last `samples` stream inputs (`WindowedImportance`; labels unused), and
    sets theta* there.
    Memory: 2 float32 vectors of the student's size, plus the window.
    """

    name = "scp"
    describe = "SCP: sliced Cramér importance of the mean output at each consolidation point"
    defaults = {"lam": 1.0, "alpha": 0.5, "slices": 100, "samples": 200}
    memory_note = "2 floats per parameter (Gamma, anchor) + a window of `samples` inputs"
    importance_store = "gamma"
    zero_padded = ("gamma",)

    def estimate(self, x, y):
        student = self.learner.student
        xi = random_unit_vectors(self.learner.rng, self.slices, student.num_classes)
        return sliced_cramer_importance(student, x, xi)

    def merge(self, old, new):
        return self.alpha * old + (1 - self.alpha) * new
