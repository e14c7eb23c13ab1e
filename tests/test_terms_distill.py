"""The distillation terms: math against hand computations, state round trips, a grown head."""
import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from edgecl.learn import LearnerConfig, OnlineLearner
from edgecl.learn.terms.attention import attention_loss, attention_map
from edgecl.learn.terms.base import Step
from edgecl.learn.terms.lwf import LwF, lwf_old_loss
from edgecl.learn.terms.pod import pod_flat, pod_scale, pod_spatial
from edgecl.learn.terms.rkd import angle_relation, rkd_angle, rkd_distance
from edgecl.learn.terms.subspace import subspace_distance, subspace_loss, top_subspace
from stream_helpers import learn_in_batches as _learn, template_stream


def _stream(classes, per_class=8, seed=0):
    return template_stream(classes, per_class, size=8, seed=seed, shuffle=True)


DISTILL = ["lwf", "hints", "attention", "rkd", "pod", "subspace", "erg"]


def _smooth_l1(a, b):
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


# ----------------------------------------------------------------- math by hand
def test_rkd_distance_hand_computed():
    s = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])  # sides 3, 4, 5; mean 4
    r = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # sides 1, 1, sqrt 2
    mean_r = (2 + math.sqrt(2)) / 3
    pairs = {(0, 1): (3 / 4, 1 / mean_r), (0, 2): (4 / 4, 1 / mean_r),
             (1, 2): (5 / 4, math.sqrt(2) / mean_r)}
    expected = 2 * sum(_smooth_l1(a, b) for a, b in pairs.values()) / 9  # N^2 entries
    assert rkd_distance(s, r).item() == pytest.approx(expected, rel=1e-5)
    assert rkd_distance(s, 7 * s).item() == pytest.approx(0.0, abs=1e-6)  # scale-free


def test_rkd_angle_hand_computed():
    s = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    a = angle_relation(s)  # a[q, p, z]: cosine at vertex q
    assert a[0, 1, 2].item() == pytest.approx(0.0, abs=1e-6)  # right angle at the origin
    assert a[1, 0, 2].item() == pytest.approx(3 / 5)
    assert a[2, 0, 1].item() == pytest.approx(4 / 5)
    assert a[1, 0, 0].item() == pytest.approx(1.0) and a[1, 1, 2].item() == 0.0
    r = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # angles 90, 45, 45
    c = math.sqrt(0.5)
    # the 6 ordered (p, z) pairs at each of the 3 vertices with p != z, p, z != q
    diffs = [0.0] * 2 + [3 / 5 - c] * 2 + [4 / 5 - c] * 2
    expected = sum(_smooth_l1(d, 0) for d in diffs) / 27
    assert rkd_angle(s, r).item() == pytest.approx(expected, rel=1e-5)


def test_attention_map_hand_computed():
    h = torch.tensor([[[[1.0, 0.0], [0.0, 2.0]], [[3.0, 0.0], [0.0, 0.0]]]])  # (1, 2, 2, 2)
    raw = torch.tensor([(1 + 9) / 2, 0.0, 0.0, 4 / 2])  # mean over channels of h^2
    torch.testing.assert_close(attention_map(h)[0], raw / raw.norm())
    g = torch.zeros(1, 1, 2, 2)
    g[0, 0, 0, 0] = 1.0  # attention on the first pixel only
    other = torch.tensor([0.0, 0.0, 0.0, 1.0])
    expected = (raw / raw.norm() - torch.tensor([1.0, 0, 0, 0])).pow(2).sum() + \
        (torch.tensor([1.0, 0, 0, 0]) - other).pow(2).sum()
    h2 = torch.zeros(1, 1, 2, 2)
    h2[0, 0, 1, 1] = 5.0
    assert attention_loss([h, g], [g, h2]).item() == pytest.approx(expected.item(), rel=1e-6)


def test_attention_pools_the_larger_map():
    small = torch.rand(2, 3, 2, 2)
    big = small.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # same map at 4x4
    assert attention_loss([small], [big]).item() == pytest.approx(0.0, abs=1e-10)


def test_pod_spatial_hand_computed():
    a = torch.tensor([[[[1.0, 2.0], [0.0, 1.0]]]])  # (1, 1, 2, 2)
    b = torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]]])

    def profile(m):
        sq = [[m[0, 0, i, j].item() ** 2 for j in range(2)] for i in range(2)]
        rows = [sum(sq[i]) for i in range(2)]         # sum over W: one value per row (H)
        cols = [sum(sq[i][j] for i in range(2)) for j in range(2)]  # sum over H
        v = rows + cols
        n = math.sqrt(sum(t * t for t in v))
        return [t / n for t in v]

    pa, pb = profile(a), profile(b)
    expected = math.sqrt(sum((x - y) ** 2 for x, y in zip(pa, pb)))
    assert pod_spatial([a], [b]).item() == pytest.approx(expected, rel=1e-6)
    assert pod_spatial([a, a], [b, a]).item() == pytest.approx(expected / 2, rel=1e-6)


def test_pod_flat_and_scale():
    cur, old = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 2.0], [2.0, 2.0]])
    assert pod_flat(cur, old).item() == pytest.approx((1 - 0 + 1 - 1) / 2)
    assert pod_scale(10, 2) == pytest.approx(math.sqrt(5))
    assert pod_scale(4, 0) == pytest.approx(2.0)  # no new class: counted as one


def test_subspace_distance_hand_computed():
    theta = 0.3
    p = torch.tensor([[1.0], [0.0]])
    p_old = torch.tensor([[math.cos(theta)], [math.sin(theta)]])
    assert subspace_distance(p, p_old).item() == pytest.approx(2 - 2 * math.cos(theta) ** 2)
    # class 0 spans e1, e2 now and e1, e3 before: ||P^T P_old||_F^2 = 1 -> 2*2 - 2 = 2;
    # class 1 (one sample, q capped at 1): the same direction -> 0
    cur = torch.tensor([[1.0, 0, 0], [0, 2.0, 0], [0, 0, 1.0]])
    old = torch.tensor([[1.0, 0, 0], [0, 0, 3.0], [0, 0, 2.0]])
    labels = torch.tensor([0, 0, 1])
    assert subspace_loss(cur, old, labels, q=2).item() == pytest.approx((2.0 + 0.0) / 2)


def test_subspace_gradient_flows_through_the_current_svd():
    torch.manual_seed(0)
    cur = torch.randn(4, 5, requires_grad=True)
    old = torch.randn(4, 5)
    loss = subspace_loss(cur, old, torch.zeros(4, dtype=torch.long), q=1)
    loss.backward()
    assert loss.item() > 0 and cur.grad.abs().sum() > 0 and torch.isfinite(cur.grad).all()
    u = top_subspace(cur.detach(), 1)[:, 0]  # the top left singular vector of (d, n) = cur.T
    _, _, vh = torch.linalg.svd(cur.detach())
    assert abs(torch.dot(u, vh[0]).item()) == pytest.approx(1.0, rel=1e-5)


def test_lwf_old_loss_hand_computed():
    cur = torch.tensor([[2.0, 0.0, 9.0]])  # the third class is new: not in the old loss
    old = torch.tensor([[1.0, 1.0]])
    t = 2.0
    p = [math.exp(1.0) / (math.exp(1.0) + 1.0), 1.0 / (math.exp(1.0) + 1.0)]  # softmax(cur/T)
    expected = -(0.5 * math.log(p[0]) + 0.5 * math.log(p[1]))
    assert lwf_old_loss(cur, old, t).item() == pytest.approx(expected, rel=1e-6)
    # y^(1/T) renormalized equals softmax(z / T)
    y = F.softmax(torch.tensor([[0.5, -1.0, 2.0]]), dim=1)
    sharpened = y.pow(1 / t) / y.pow(1 / t).sum()
    torch.testing.assert_close(sharpened, F.softmax(torch.tensor([[0.5, -1.0, 2.0]]) / t, dim=1))


class _Learner:
    anchor = None
    config = LearnerConfig()


def test_lwf_balanced_lambda_is_the_old_class_share():
    step = Step(num_classes=4)
    step.add("stream", torch.zeros(2, 1), torch.tensor([2, 3]))
    step.seal()
    step.logits = torch.tensor([[0.0, 1.0, 2.0, 0.0], [1.0, 0.0, 0.0, 3.0]])
    step.anchor_logits = torch.tensor([[1.0, 0.0], [0.0, 0.5]])  # the anchor knew 2 of 4
    old = lwf_old_loss(step.logits, step.anchor_logits, 2.0).item()
    new = F.cross_entropy(step.logits, step.y).item()
    plain = LwF(_Learner(), weight=3.0)
    assert plain.loss(step).item() == pytest.approx(3.0 * old, rel=1e-6)
    balanced = LwF(_Learner(), weight=3.0, balanced=True)
    lam = 2 / 4
    # the learner adds `new` itself: total = lam * 3 * old + (1 - lam) * new
    assert balanced.loss(step).item() + new == pytest.approx(lam * 3 * old + (1 - lam) * new,
                                                             rel=1e-6)


def test_erg_angle_difference_hand_computed():
    from edgecl.learn.terms.erg import ERG
    term = ERG(_Learner(), weight=2.0)
    step = Step(num_classes=2)
    step.add("stream", torch.zeros(1, 1), torch.tensor([0]))
    step.add("erg", torch.zeros(3, 1), torch.tensor([0, 1, 1]))
    step.seal()
    now = torch.tensor([[9.0, 9.0], [0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])  # row 0: the stream
    before = torch.tensor([[5.0, 5.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    step.features, step.anchor_logits = {"embedding": now}, torch.zeros(4, 2)
    step.anchor_features = {"embedding": before}

    def cosine(pts, q, p, z):
        (qx, qy), (px, py), (zx, zy) = pts[q], pts[p], pts[z]
        u, v = (px - qx, py - qy), (zx - qx, zy - qy)
        nu, nv = math.hypot(*u), math.hypot(*v)
        return 0.0 if nu == 0 or nv == 0 else (u[0] * v[0] + u[1] * v[1]) / (nu * nv)

    a, b = now[1:].tolist(), before[1:].tolist()
    diffs = [abs(cosine(b, q, p, z) - cosine(a, q, p, z))
             for q, p, z in itertools.product(range(3), repeat=3)]
    assert term.loss(step).item() == pytest.approx(2.0 * sum(diffs) / 27, rel=1e-5)


def test_exemplar_rows_are_the_own_draw_or_every_other_replay_draw():
    from edgecl.learn.terms.distill import exemplar_rows

    def step_with(*parts):
        step = Step()
        for name, n in parts:
            step.add(name, torch.zeros(n, 1), torch.zeros(n, dtype=torch.long))
        step.seal()
        return step

    assert exemplar_rows(step_with(("stream", 2), ("der", 3), ("erg", 4)), "erg") == slice(5, 9)
    assert exemplar_rows(step_with(("stream", 2), ("der", 3), ("derpp", 2)), "erg") == slice(2, 7)
    assert exemplar_rows(step_with(("stream", 2)), "erg") is None


# ------------------------------------------------------ inside a real learner
def _learner(name, **terms):
    buffer = 24 if name in ("subspace", "erg") else 0  # these two distill buffer exemplars
    return OnlineLearner(LearnerConfig(method=name, buffer_size=buffer, consolidate_min_gap=2,
                                       momentum=0.9, terms={name: terms} if terms else {}))


def _term_losses(learner, name):
    """Record what the term returns at each step."""
    term = next(t for t in learner.terms if t.name == name)
    seen, loss = [], term.loss

    def spy(step):
        value = loss(step)
        seen.append(None if value is None else float(value.detach()))
        return value

    term.loss = spy
    return seen


@pytest.mark.parametrize("name", DISTILL)
def test_works_after_the_head_has_grown(name):
    learner = _learner(name)
    seen = _term_losses(learner, name)
    _learn(learner, *_stream([0, 1]))
    assert learner.anchor is None and all(v is None for v in seen)  # nothing to keep yet
    x, y = _stream([2, 3], per_class=16, seed=1)
    _learn(learner, x, y)
    assert learner.anchor.head.out_features == 2 and learner.student.head.out_features == 4
    after = seen[-len(y) // 8 + 1:]  # the steps after the one that brought class 2
    assert after and all(v is not None and math.isfinite(v) for v in after)
    assert any(abs(v) > 0 for v in after)
    assert learner.skipped_steps == 0


@pytest.mark.parametrize("name", DISTILL)
def test_state_dict_round_trip_gives_the_same_next_loss(name):
    learner = _learner(name)
    _learn(learner, *_stream([0, 1]))
    x, y = _stream([2, 3], per_class=16, seed=1)
    _learn(learner, x[:16], y[:16])
    assert learner.anchor is not None
    state = copy.deepcopy(learner.state_dict())
    expected = learner.learn_many(x[16:24], y[16:24])["loss"]
    restored = OnlineLearner(LearnerConfig(method="finetune"))
    restored.load_state_dict(state)
    assert restored.anchor.head.out_features == 2
    got = restored.learn_many(x[16:24], y[16:24])["loss"]
    assert got == pytest.approx(expected, rel=1e-5)


def test_hints_regressor_learns_and_is_in_the_state():
    learner = _learner("hints")
    _learn(learner, *_stream([0, 1]))
    x, y = _stream([2, 3], per_class=16, seed=1)
    _learn(learner, x[:8], y[:8])
    term = learner.terms[0]
    eye = torch.eye(32)[:, :, None, None]
    assert term.regressor.weight.shape == (32, 32, 1, 1)
    _learn(learner, x[8:], y[8:])
    assert not torch.equal(term.regressor.weight.detach(), eye)  # trained with the student
    state = learner.state_dict()["terms"]["hints"]
    torch.testing.assert_close(state["regressor"]["weight"], term.regressor.weight.detach())
    assert state["optimizer"]["state"]  # momentum buffers travel with it
    assert learner.stats()["terms_bytes"] == learner.anchor_bytes() + 4 * (32 * 32 + 32)
