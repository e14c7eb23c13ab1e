"""Exemplar relation graph distillation (Dong et al. 2021, few-shot class-incremental)."""
from __future__ import annotations

from edgecl.learn.terms.base import Step
from edgecl.learn.terms.distill import ExemplarTerm
from edgecl.learn.terms.rkd import angle_relation


class ERG(ExemplarTerm):
    """ERG: `weight * mean_{p,q,z} |A_anchor(p,q,z) - A(p,q,z)|^p` over a reservoir draw
    of `draw` exemplars, with `A(p,q,z) = <e_pq, e_zq>` the angle relation of their `tap`
    features (default the embedding), computed with the anchor and with the current model.
    p = 1 (default) is the L1 norm of the difference divided by the number of triplets.

    The graph's vertices are the buffer's exemplars: the paper builds it from the old
    classes' exemplars when a session ends and preserves it while the next session is
    learned. Here the anchor is taken at each consolidation point (a new class arrives, or
    every `consolidate_every` steps) and the graph is rebuilt each step on a fresh draw, so
    every exemplar's relations are kept in expectation; `draw = 0` uses the replay draws of
    the other terms instead (DER++'s).
    """

    name = "erg"
    describe = "exemplar relation graph: keep the triplet angles among buffer exemplars"
    defaults = {"weight": 1.0, "draw": 10, "p": 1, "tap": "embedding"}

    def loss(self, step: Step):
        got = self.exemplars(step)
        if got is None or len(got[2]) < 3:
            return None
        current, anchor, _ = got
        difference = angle_relation(anchor) - angle_relation(current)
        return self.weight * difference.abs().pow(self.p).mean()
