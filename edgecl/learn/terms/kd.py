"""Soft-target knowledge distillation from the teacher (Hinton et al. 2015)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from edgecl.learn.terms.base import Step, Term


def soft_target_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    """`T^2 * KL(p(z_t, T) || p(z_s, T))`, mean over the batch; T^2 keeps gradients at the
    scale of the hard-label loss when T changes."""
    t = temperature
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits / t, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()
    return t * t * kl


class KD(Term):
    """KD: `weight * T^2 * KL(p(z_teacher, T) || p(z_student, T))` over the whole step batch
    (stream and replay), with p the softmax at temperature T. The teacher's head grows with
    the student's, so both cover the same classes."""

    name = "kd"
    describe = "soft-target distillation from the ResNet teacher (temperature T, T^2 scale)"
    defaults = {"weight": 1.0, "temperature": 2.0}
    memory_note = "nothing of its own; it needs a teacher, counted under the teacher setting"

    def loss(self, step: Step):
        if step.teacher_logits is None:
            return None
        return self.weight * soft_target_kd(step.logits, step.teacher_logits, self.temperature)
