"""PODNet's pooled outputs distillation (Douillard et al. 2020), spatial and flat."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from edgecl.learn.terms.base import Step
from edgecl.learn.terms.distill import DistillTerm
from edgecl.models import EMBEDDING


def pod_spatial(current: list[torch.Tensor], old: list[torch.Tensor]) -> torch.Tensor:
    """POD-spatial: per stage, square the (B, C, H, W) activations, sum over W (a C x H
    profile) and over H (C x W), concatenate, L2-normalize per sample; the Euclidean
    distance between current and old, mean over the batch, mean over stages (the
    authors' code)."""
    total = 0.0
    for a, b in zip(current, old):
        a, b = a.pow(2), b.pow(2)
        pa = F.normalize(torch.cat([a.sum(dim=3).flatten(1), a.sum(dim=2).flatten(1)], 1), dim=1)
        pb = F.normalize(torch.cat([b.sum(dim=3).flatten(1), b.sum(dim=2).flatten(1)], 1), dim=1)
        total = total + (pa - pb).norm(dim=1).mean()
    return total / len(current)


def pod_flat(current: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """POD-flat: cosine embedding loss `mean (1 - cos(h, h_old))` on the final embedding."""
    return (1.0 - F.cosine_similarity(current, old, dim=1)).mean()


def pod_scale(seen: int, new: int) -> float:
    """PODNet's adaptive weight `sqrt(seen classes / new classes)`: the more old classes
    there are to keep, relative to what is being added, the stronger the pull."""
    return math.sqrt(seen / max(new, 1))


class POD(DistillTerm):
    """PODNet: `sqrt(K_all / K_new) * (spatial * POD_spatial(stages) + flat * POD_flat)` over
    the whole step batch, comparing the current model with the anchor (the student frozen at
    the last consolidation point). Defaults are the paper's factors (3 and 1).

    Task boundaries: PODNet distills the model of the previous task; here the anchor is
    taken at each consolidation point (a new class arrives, or every `consolidate_every`
    steps). The paper's "new classes" are those of the current task: here K_new = the
    classes added since the anchor was taken (K_all minus the anchor's head width), at
    least 1 (a periodic consolidation point without a new class then gives sqrt(K_all)).
    """

    name = "pod"
    describe = "PODNet: pooled spatial statistics of several stages plus the embedding's direction"
    defaults = {"spatial": 3.0, "flat": 1.0, "stages": "stage1,stage2,stage3"}
    tap_params = ("stages",)

    def __init__(self, learner, **params):
        super().__init__(learner, **params)
        self.stage_taps = self.taps
        self.taps = (*self.taps, EMBEDDING)

    def loss(self, step: Step):
        ref = self.reference(step)
        if ref is None:
            return None
        old_logits, old = ref
        scale = pod_scale(step.num_classes, step.num_classes - old_logits.shape[1])
        spatial = pod_spatial([step.features[t] for t in self.stage_taps],
                              [old[t] for t in self.stage_taps])
        flat = pod_flat(step.features[EMBEDDING], old[EMBEDDING])
        return scale * (self.spatial * spatial + self.flat * flat)
