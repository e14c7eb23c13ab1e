"""Synaptic Intelligence (SI), Zenke, Poole & Ganguli 2017."""
from __future__ import annotations

from edgecl.learn.terms.base import Step
from edgecl.learn.terms.importance import FollowsPath, ImportancePenalty


class SI(FollowsPath, ImportancePenalty):
    """SI: penalty `sum_k (1/2) * min(lam * Omega_k, 1/lr) * (theta_k - theta*_k)^2`.

    Along the trajectory, per parameter, `omega_k += -g_k * delta_theta_k` every step, with g
    the gradient before SI's own penalty and delta_theta the parameter's actual movement in
    that step (`PathIntegral`). At a consolidation point
    `Omega_k += omega_k / ((theta_k - theta*_k)^2 + xi)`, then omega is reset and
    theta* = theta. The first theta* is the student at its first step (its initialization).
    Zenke's surrogate loss `c * sum Omega (theta - theta*)^2` is this with c = lam / 2.

    The task gradient: the learner does one backward of the total loss, so `p.grad` includes
    SI's own penalty; the term subtracts that penalty's analytic gradient
    `min(lam * Omega, 1/lr) * (theta - theta*)` (`task_gradients`), exact because the penalty
    is quadratic. Other terms' gradients stay in g (with replay, the replay loss is part of
    the "task" the path integral credits).

    Task boundaries: the paper updates Omega at the end of each task; edgecl does it at each
    consolidation point (a never-seen label arrives, or every `consolidate_every` steps).
    Memory: 5 float32 vectors of the student's size (Omega, theta*, omega, and theta and g of
    the last step, needed to measure its movement).
    """

    name = "si"
    describe = "SI: path-integral importance (-g * delta theta), folded in at consolidation"
    defaults = {"lam": 10.0, "xi": 0.1}
    memory_note = "5 floats per parameter (Omega, anchor, omega, last theta, last gradient)"
    vectors = 5

    def after_backward(self, step: Step) -> None:
        self.record_path(step)

    def consolidate(self) -> None:
        params = self._params()
        self.path.flush(params)
        for name, w in self.path.take().items():
            moved = params[name].detach() - self.anchor[name]
            new = w / (moved.pow(2) + self.xi)
            old = self.importance.get(name)
            self.importance[name] = new if old is None else old + new
        if self.anchor:
            self.set_anchor()
