"""Relational knowledge distillation, distance and angle (Park et al. 2019)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from edgecl.learn.terms.base import Step
from edgecl.learn.terms.distill import DistillTerm, flat


def normalized_distances(r: torch.Tensor) -> torch.Tensor:
    """(N, N) Euclidean distances `||r_i - r_j||`, divided by their mean over pairs i != j."""
    d = torch.cdist(r, r)
    off = ~torch.eye(len(r), dtype=torch.bool, device=r.device)
    return d / d[off].mean().clamp_min(1e-12)


def angle_relation(r: torch.Tensor) -> torch.Tensor:
    """(N, N, N) `A[q, p, z] = <e_pq, e_zq>` with `e_pq = (r_p - r_q) / ||r_p - r_q||`: the
    cosine of the angle at vertex q of the triangle (p, q, z); 0 where p or z equals q."""
    e = F.normalize(r.unsqueeze(0) - r.unsqueeze(1), dim=2)  # e[q, p] = unit(r_p - r_q)
    return torch.bmm(e, e.transpose(1, 2))


def rkd_distance(student: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """smooth-L1 between normalized distance matrices, mean over the N^2 entries (the
    authors' code; the diagonal is 0 in both)."""
    return F.smooth_l1_loss(normalized_distances(student), normalized_distances(reference))


def rkd_angle(student: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """smooth-L1 between angle relations, mean over the N^3 triplets (the authors' code)."""
    return F.smooth_l1_loss(angle_relation(student), angle_relation(reference))


class RKD(DistillTerm):
    """RKD: `distance * smoothL1(psi_D(r_s), psi_D(r_ref)) + angle * smoothL1(psi_A(r_s),
    psi_A(r_ref))` over the whole step batch, r the `tap` features (default the embedding;
    maps are flattened), psi_D the pairwise distances divided by their mean, psi_A the
    angle cosines of every triplet. Relations are compared, not features, so student and
    teacher widths may differ. The paper's weights are 25 and 50 (1 : 2, kept here).

    `source = "anchor"` (default): keep the geometry of the batch as the student saw it at
    the last consolidation point (the paper distills a fixed teacher; the anchor stands in
    for the previous task's model and is refreshed at each consolidation point).
    `source = "teacher"`: the ResNet teacher's relations, as in the paper.
    """

    name = "rkd"
    describe = "relational KD: match pairwise distances and triplet angles of the batch"
    defaults = {"distance": 1.0, "angle": 2.0, "tap": "embedding", "source": "anchor"}
    tap_params = ("tap",)

    def loss(self, step: Step):
        ref = self.reference(step)
        if ref is None or len(step.x) < 3:
            return None
        rs, rr = flat(step.features[self.tap]), flat(ref[1][self.tap])
        return self.distance * rkd_distance(rs, rr) + self.angle * rkd_angle(rs, rr)
