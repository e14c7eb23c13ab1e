"""Attention transfer (Zagoruyko & Komodakis 2017)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from edgecl.learn.terms.base import Step
from edgecl.learn.terms.distill import DistillTerm, as_maps, match_spatial


def attention_map(h: torch.Tensor) -> torch.Tensor:
    """`a(h) = normalize(flatten(mean_c h_c^2))`: where a (B, C, H, W) map is active, as a
    unit vector of H*W per sample."""
    return F.normalize(h.pow(2).mean(dim=1).flatten(1), dim=1)


def attention_loss(student: list[torch.Tensor], reference: list[torch.Tensor]) -> torch.Tensor:
    """`sum_layers mean_batch ||a(h_s) - a(h_ref)||^2`; maps of different resolution are
    average-pooled to the smaller one before the attention map is taken."""
    total = 0.0
    for hs, hr in zip(student, reference):
        hs, hr = match_spatial(as_maps(hs), as_maps(hr))
        total = total + (attention_map(hs) - attention_map(hr)).pow(2).sum(dim=1).mean()
    return total


class Attention(DistillTerm):
    """Attention transfer: `weight * sum_l mean_batch ||a(h_s^l) - a(h_ref^l)||^2` over the
    taps in `stages` (default stage1, stage2, stage3), on the whole step batch.

    `source = "anchor"` (default): the reference is the student frozen at the last
    consolidation point, so the term keeps *where* the network looks on old and new data
    while the features themselves may change (the paper distills a fixed teacher; the anchor
    plays the teacher and is refreshed at each consolidation point instead of each task).
    `source = "teacher"`: the ResNet teacher's stage maps, pooled to the student's size.
    """

    name = "attention"
    describe = "attention transfer: match normalized spatial attention maps of several stages"
    defaults = {"weight": 1.0, "stages": "stage1,stage2,stage3", "source": "anchor"}
    tap_params = ("stages",)

    def loss(self, step: Step):
        ref = self.reference(step)
        if ref is None:
            return None
        return self.weight * attention_loss([step.features[t] for t in self.taps],
                                            [ref[1][t] for t in self.taps])
