"""Dark Experience Replay (DER), Buzzega et al. 2020."""
from __future__ import annotations

import torch

from edgecl.learn.terms.base import Step, Term


def masked_logit_mse(current: torch.Tensor, stored: torch.Tensor,
                     width: torch.Tensor) -> torch.Tensor:
    """Mean squared difference over the classes each stored row had when it was stored.

    Row i compares columns j < width[i] only: a head that grew since then has outputs the
    stored logits never saw. With equal widths this is exactly `F.mse_loss` (mean over
    batch x classes), the scale the reference code and our alpha use.
    """
    k = stored.shape[1]
    cols = torch.arange(k, device=stored.device)
    mask = (cols[None, :] < width[:, None]).to(current.dtype)
    diff = (current[:, :k] - stored) * mask
    return diff.pow(2).sum() / mask.sum().clamp_min(1.0)


class DER(Term):
    """DER: `alpha * mean ||z' - f(x')||^2` over a reservoir draw (x', z'), where z' are the
    logits the model gave x' when it entered the buffer (see `masked_logit_mse`)."""

    name = "der"
    describe = "dark experience replay: match the logits stored with each buffered sample"
    defaults = {"alpha": 0.3, "draw": 10}

    def prepare(self, step: Step, rng) -> None:
        self.learner.draw_replay(step, "der", self.draw)

    def loss(self, step: Step):
        if not step.has("der"):
            return None
        part = step.parts["der"]
        return self.alpha * masked_logit_mse(step.logits_of("der"), part.stored_logits,
                                             part.stored_width)
