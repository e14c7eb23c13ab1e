"""FitNets hints (Romero et al. 2015)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgecl.learn.terms.base import Step
from edgecl.learn.terms.distill import DistillTerm, as_maps, match_spatial, tap_channels
from edgecl.models import model_bytes


def hint_loss(regressed: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`mean (r(h_s) - h_t)^2`: the squared L2 distance divided by the number of elements,
    so the weight does not depend on the map size. Maps of different resolution are
    average-pooled to the smaller one first."""
    regressed, target = match_spatial(regressed, target)
    return F.mse_loss(regressed, target)


class Hints(DistillTerm):
    """Hints: `weight * mean (r(h_s(x)) - h_ref(x))^2` at tap `tap` (default `stage2`, the
    middle of the network: FitNets' guided layer), over the whole step batch. r is a 1x1
    convolution from the student's channels to the reference's, trained with the student
    by its own SGD optimizer at the learner's lr and momentum (in this term's state_dict).

    `source = "teacher"`: the ResNet teacher is the hint, as in FitNets; r is randomly
    initialized. `source = "anchor"` (default): the hint is the student frozen at the last
    consolidation point, and r starts as the identity (same channels), so the term starts at
    zero and lets the features move only as far as a 1x1 map can undo (FitNets' two-stage
    training has no task boundary to map; the anchor is refreshed at consolidation points).
    """

    name = "hints"
    describe = "FitNets hints: a trained 1x1 regressor maps a student map to the reference's"
    defaults = {"weight": 1.0, "tap": "stage2", "source": "anchor"}
    tap_params = ("tap",)
    memory_note = "a 1x1 regressor (C_student x C_reference), plus the anchor for source anchor"

    def __init__(self, learner, **params):
        super().__init__(learner, **params)
        self.regressor: nn.Conv2d | None = None
        self.optimizer: torch.optim.SGD | None = None

    def _build(self, c_in: int, c_out: int) -> None:
        self.regressor = nn.Conv2d(c_in, c_out, 1)
        if self.source == "anchor" and c_in == c_out:
            with torch.no_grad():
                self.regressor.weight.copy_(torch.eye(c_in)[:, :, None, None])
                self.regressor.bias.zero_()
        config = self.learner.config
        self.optimizer = torch.optim.SGD(self.regressor.parameters(), lr=config.lr,
                                         momentum=config.momentum)

    def loss(self, step: Step):
        ref = self.reference(step)
        if ref is None:
            return None
        student, target = as_maps(step.features[self.tap]), as_maps(ref[1][self.tap])
        if self.regressor is None:
            self._build(student.shape[1], target.shape[1])
        self.optimizer.zero_grad(set_to_none=True)
        return self.weight * hint_loss(self.regressor(student), target)

    def after_backward(self, step: Step) -> None:
        if self.regressor is not None and self.regressor.weight.grad is not None:
            self.optimizer.step()

    def extra_bytes(self) -> int:
        return 0 if self.regressor is None else model_bytes(self.regressor)

    @classmethod
    def memory_bytes(cls, student, input_shape, params) -> int:
        c = tap_channels(student, input_shape, params["tap"])
        # the reference has the student's channels when it is the anchor; the teacher's
        # widths are not known here, so its regressor is counted at the student's width too
        return super().memory_bytes(student, input_shape, params) + 4 * (c * c + c)

    def state_dict(self) -> dict:
        if self.regressor is None:
            return {}
        return {"regressor": self.regressor.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            self.regressor = self.optimizer = None
            return
        c_out, c_in = state["regressor"]["weight"].shape[:2]
        self._build(c_in, c_out)
        self.regressor.load_state_dict(state["regressor"])
        self.optimizer.load_state_dict(state["optimizer"])
