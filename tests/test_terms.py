import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgecl.learn.terms.base import Step
from edgecl.learn.terms.der import masked_logit_mse
from edgecl.learn.terms.derpp import DERPP
from edgecl.learn.terms.ewcpp import EWCPP, per_sample_fisher
from edgecl.learn.terms.kd import soft_target_kd


def test_masked_logit_mse_hand_computed():
    current = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 5.0]])
    stored = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    width = torch.tensor([3, 2])  # row 1 was stored when only 2 classes existed
    # row 0: 1 + 4 + 9 over 3 entries; row 1: 1 + 1 over 2 entries -> 16 / 5
    assert masked_logit_mse(current, stored, width).item() == pytest.approx(16 / 5)


def test_masked_logit_mse_equals_mse_loss_when_widths_match():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    assert masked_logit_mse(a, b, torch.full((4,), 3)).item() == pytest.approx(
        F.mse_loss(a, b).item(), rel=1e-6)


class _FakeLearner:
    def __init__(self, lr=0.1):
        self.student = nn.Linear(2, 2)
        self.config = type("C", (), {"lr": lr})()


def test_derpp_loss_hand_computed():
    term = DERPP(_FakeLearner(), alpha=0.5, beta=2.0, shared_draw=False)
    step = Step()
    step.add("stream", torch.zeros(1, 1), torch.tensor([0]))
    step.add("der", torch.zeros(1, 1), torch.tensor([0]),
             stored_logits=torch.tensor([[1.0, 0.0]]), stored_width=torch.tensor([2]))
    step.add("derpp", torch.zeros(1, 1), torch.tensor([1]))
    step.seal()
    step.logits = torch.tensor([[9.0, 9.0, 9.0], [2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    # alpha * ((2-1)^2 + (1-0)^2)/2 + beta * CE([0,0,0], 1) = 0.5*1 + 2*ln 3
    assert term.loss(step).item() == pytest.approx(0.5 + 2 * math.log(3), rel=1e-6)
    # one shared draw: the label term reads the same row as the logit term (label 0 there)
    shared = DERPP(_FakeLearner(), alpha=0.5, beta=2.0, shared_draw=True)
    ce = -math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(1.0) + 1.0))
    assert shared.loss(step).item() == pytest.approx(0.5 + 2 * ce, rel=1e-6)


def test_derpp_correct_only_skips_the_logits_that_got_their_label_wrong():
    """Row 0 was stored right (argmax 0, label 0), row 1 wrong (argmax 0, label 1), row 2
    with a narrower head whose classes did not include its label: only row 0 is matched."""
    step = Step()
    step.add("stream", torch.zeros(1, 1), torch.tensor([0]))
    step.add("der", torch.zeros(3, 1), torch.tensor([0, 1, 2]),
             stored_logits=torch.tensor([[2.0, 0.0, 0.0], [3.0, 1.0, 0.0], [0.0, 5.0, 0.0]]),
             stored_width=torch.tensor([3, 3, 2]))
    step.seal()
    step.logits = torch.tensor([[9.0, 9.0, 9.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0],
                                [4.0, 4.0, 4.0]])
    term = DERPP(_FakeLearner(), alpha=1.0, beta=0.0, correct_only=True)
    assert term.loss(step).item() == pytest.approx((4 + 0 + 0) / 3)  # row 0 alone
    every = DERPP(_FakeLearner(), alpha=1.0, beta=0.0)
    assert every.loss(step).item() == pytest.approx((4 + (4 + 0 + 1) + (16 + 1)) / 8)


def _tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 4), nn.Dropout(0.5))


def test_per_sample_fisher_matches_explicit_loop():
    model = _tiny_model()
    model.train()
    model(torch.randn(8, 1, 6, 6))  # give BatchNorm running statistics
    x, y = torch.randn(5, 1, 6, 6), torch.tensor([0, 1, 2, 3, 1])
    fisher = per_sample_fisher(model, x, y)
    assert model.training  # mode restored
    model.eval()
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(5):
        model.zero_grad()
        F.log_softmax(model(x[i:i + 1]), dim=1)[0, y[i]].backward()
        for n, p in model.named_parameters():
            expected[n] += p.grad.pow(2) / 5
    for n in expected:
        torch.testing.assert_close(fisher[n], expected[n], rtol=1e-4, atol=1e-7)
    # and it is not the squared mini-batch gradient
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    w = "4.weight"
    assert not torch.allclose(fisher[w], model[4].weight.grad.pow(2), rtol=0.1)


def test_ewcpp_running_fisher_and_penalty():
    learner = _FakeLearner(lr=0.01)
    term = EWCPP(learner, lam=2.0, alpha=0.9, fisher_every=1)
    x, y = torch.randn(3, 2), torch.tensor([0, 1, 1])
    step = Step(index=0)
    step.add("stream", x, y)
    step.seal()
    term.after_backward(step)
    f1 = {k: v.clone() for k, v in term.fisher.items()}
    torch.testing.assert_close(f1["weight"], per_sample_fisher(learner.student, x, y)["weight"])
    x2 = torch.randn(3, 2)
    step2 = Step(index=1)
    step2.add("stream", x2, y)
    step2.seal()
    term.after_backward(step2)
    f_new = per_sample_fisher(learner.student, x2, y)
    torch.testing.assert_close(term.fisher["weight"], 0.9 * f_new["weight"] + 0.1 * f1["weight"])
    assert term.penalty() is None  # no anchor yet
    term.consolidate()
    with torch.no_grad():
        learner.student.weight += 0.5
    expected = sum(0.5 * (2.0 * term.fisher[n]).clamp(max=100.0) * (p - term.anchor[n]).pow(2)
                   for n, p in learner.student.named_parameters())
    expected = sum(e.sum() for e in expected) if isinstance(expected, list) else expected.sum()
    assert term.penalty().item() == pytest.approx(expected.item(), rel=1e-5)
    assert term.penalty().item() > 0
    # the learner never sees it as a loss: its exact gradient is added after backward
    assert term.loss(step2) is None
    params = list(learner.student.parameters())
    for p in params:
        p.grad = None
    term.penalty().backward()
    autograd = [p.grad.clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    term.add_penalty_gradient()
    for got, want in zip([p.grad for p in params], autograd):
        torch.testing.assert_close(got, want)


def test_ewcpp_stiffness_is_capped_at_one_over_lr():
    learner = _FakeLearner(lr=0.5)
    term = EWCPP(learner, lam=1e6)
    term.fisher = {n: torch.ones_like(p) for n, p in learner.student.named_parameters()}
    term.consolidate()
    with torch.no_grad():
        for p in learner.student.parameters():
            p += 1.0
    n_params = sum(p.numel() for p in learner.student.parameters())
    assert term.penalty().item() == pytest.approx(0.5 * 2.0 * n_params)
    for p in learner.student.parameters():
        p.grad = torch.zeros_like(p)
    term.add_penalty_gradient()  # the capped stiffness 1/lr = 2 times the distance 1
    for p in learner.student.parameters():
        torch.testing.assert_close(p.grad, torch.full_like(p, 2.0))


def test_kd_matches_formula():
    s, t = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[5.0, 1.0, 0.0]])
    T = 4.0
    p_t = torch.softmax(t / T, 1)
    p_s = torch.softmax(s / T, 1)
    expected = T * T * (p_t * (p_t.log() - p_s.log())).sum()
    assert soft_target_kd(s, t, T).item() == pytest.approx(expected.item(), rel=1e-6)
    # Hinton's example: logits 5 and 1 at T=1 -> 0.982 / 0.018, T=10 -> 0.599 / 0.401
    z = torch.tensor([5.0, 1.0])
    assert torch.softmax(z, 0)[0].item() == pytest.approx(0.982, abs=1e-3)
    assert torch.softmax(z / 10, 0)[0].item() == pytest.approx(0.599, abs=1e-3)
    assert soft_target_kd(t, t, T).item() == pytest.approx(0.0, abs=1e-7)


def test_unknown_term_parameter_is_named():
    with pytest.raises(ValueError, match="unknown parameter"):
        DERPP(_FakeLearner(), gamma=1.0)
