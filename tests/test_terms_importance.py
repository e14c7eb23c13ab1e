"""Parameter-importance terms: each pinned against an explicit computation on a tiny model,
then saved and restored in a live learner, and used after the head grew."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgecl.learn import LearnerConfig, OnlineLearner
from edgecl.learn.terms import TERMS
from edgecl.learn.terms.base import Step
from edgecl.learn.terms.ewc import EWC
from edgecl.learn.terms.mas import MAS, mas_importance
from edgecl.learn.terms.rwalk import RWalk
from edgecl.learn.terms.scp import SCP, random_unit_vectors, sliced_cramer_importance
from edgecl.learn.terms.si import SI

IMPORTANCE_TERMS = ["ewc", "si", "mas", "rwalk", "scp"]


def _tiny_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 4 * 4, 4))
    model(torch.randn(8, 1, 6, 6))  # BatchNorm running statistics
    return model


class _FakeLearner:
    def __init__(self, lr=0.1):
        self.student = _tiny_model()
        self.config = type("C", (), {"lr": lr})()
        self.rng = np.random.default_rng(0)


def _step(x, y, index=0):
    step = Step(index=index)
    step.add("stream", x, y)
    step.seal()
    return step


def _explicit_mean(model, x, y, fn, transform):
    """mean_i transform(grad of fn(model(x_i), y_i)), one backward per sample, eval mode."""
    model.eval()
    out = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(len(x)):
        model.zero_grad()
        fn(model(x[i:i + 1])[0], y[i]).backward()
        for n, p in model.named_parameters():
            out[n] += transform(p.grad) / len(x)
    model.train()
    return out


def _log_lik(logits, y):
    return F.log_softmax(logits, dim=0)[y]


def _assert_close(got: dict, expected: dict, **tol):
    assert got.keys() == expected.keys()
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], **tol)


# ------------------------------------------------------------------------------- math
def test_ewc_fisher_at_the_consolidation_point_on_the_recent_window():
    learner = _FakeLearner()
    term = EWC(learner, lam=1.0, gamma=0.5, samples=6)
    x, y = torch.randn(8, 1, 6, 6), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    term.after_backward(_step(x[:4], y[:4]))
    term.after_backward(_step(x[4:], y[4:], 1))
    assert len(term.recent) == 6  # only the last `samples` are kept
    term.consolidate()
    first = _explicit_mean(learner.student, x[2:], y[2:], _log_lik, torch.square)
    _assert_close(term.fisher, first, rtol=1e-4, atol=1e-8)
    assert len(term.recent) == 0  # each sample counts in one Fisher only
    _assert_close(term.anchor, dict(learner.student.named_parameters()))
    with torch.no_grad():  # the model moves on; the next point's Fisher is at the new weights
        learner.student[4].weight += 0.3
    x2 = torch.randn(3, 1, 6, 6)
    term.after_backward(_step(x2, y[:3], 2))
    term.consolidate()
    second = _explicit_mean(learner.student, x2, y[:3], _log_lik, torch.square)
    _assert_close(term.fisher, {n: 0.5 * first[n] + second[n] for n in first},
                  rtol=1e-4, atol=1e-8)


def test_ewc_window_keeps_uint8_streams_as_bytes_exactly():
    learner = _FakeLearner()
    learner.input_dtype = "uint8"
    term = EWC(learner, samples=4)
    raw = torch.randint(0, 256, (4, 1, 6, 6), dtype=torch.uint8)
    x = raw.float().div_(255.0)  # as the learner feeds a uint8 stream
    term.after_backward(_step(x, torch.zeros(4, dtype=torch.long)))
    assert term.recent.x.dtype == torch.uint8
    assert torch.equal(term.recent.inputs(), x)


def _train_with_si(term, learner, batches, momentum=0.9):
    """Train the tiny model with SGD (+ momentum) on CE + the term; return the explicit path
    integral sum_t -g_CE(t) * (theta(t+1) - theta(t)) computed independently."""
    model = learner.student
    opt = torch.optim.SGD(model.parameters(), lr=learner.config.lr, momentum=momentum)
    omega = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for index, (x, y) in enumerate(batches):
        step = _step(x, y, index)
        model.train()
        step.logits = model(step.x)
        task = F.cross_entropy(step.logits, step.y)
        task_grad = torch.autograd.grad(task, list(model.parameters()), retain_graph=True)
        loss = task + (term.loss(step) or 0.0)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad()
        loss.backward()
        term.after_backward(step)
        opt.step()
        for (n, p), g in zip(model.named_parameters(), task_grad):
            omega[n] -= g * (p.detach() - before[n])
    return omega


def _batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 1, 6, 6, generator=g), torch.randint(0, 4, (4,), generator=g))
            for _ in range(n)]


def test_si_path_integral_and_importance_match_an_explicit_loop():
    learner = _FakeLearner(lr=0.05)
    term = SI(learner, lam=0.5, xi=0.1)
    start = {n: p.detach().clone() for n, p in learner.student.named_parameters()}
    omega = _train_with_si(term, learner, _batches(5, 0))
    term.consolidate()
    params = dict(learner.student.named_parameters())
    first = {n: omega[n] / ((params[n].detach() - start[n]).pow(2) + 0.1) for n in omega}
    _assert_close(term.importance, first, rtol=1e-4, atol=1e-7)
    assert term.loss(Step()) is not None
    # second interval: the penalty is on, and omega must still credit the CE gradient only
    anchor = {n: p.detach().clone() for n, p in params.items()}
    omega2 = _train_with_si(term, learner, _batches(5, 1))
    assert any(v.abs().max() > 0 for v in term.importance.values())
    term.consolidate()
    second = {n: first[n] + omega2[n] / ((params[n].detach() - anchor[n]).pow(2) + 0.1)
              for n in omega2}
    _assert_close(term.importance, second, rtol=1e-3, atol=1e-6)


def test_mas_importance_matches_an_explicit_loop_and_halves_on_merge():
    learner = _FakeLearner()
    x = torch.randn(5, 1, 6, 6)
    expected = _explicit_mean(learner.student, x, torch.zeros(5, dtype=torch.long),
                              lambda f, _y: f.pow(2).sum(), torch.abs)
    _assert_close(mas_importance(learner.student, x), expected, rtol=1e-4, atol=1e-7)
    term = MAS(learner, samples=10)
    term.after_backward(_step(x, torch.zeros(5, dtype=torch.long)))
    term.consolidate()
    x2 = torch.randn(3, 1, 6, 6)
    term.after_backward(_step(x2, torch.zeros(3, dtype=torch.long), 1))
    term.consolidate()
    new = mas_importance(learner.student, x2)
    _assert_close(term.importance, {n: 0.5 * (expected[n] + new[n]) for n in new},
                  rtol=1e-4, atol=1e-7)


def test_rwalk_score_and_normalized_importance_by_hand():
    learner = _FakeLearner(lr=0.05)
    term = RWalk(learner, lam=1.0, alpha=0.9, fisher_every=2, eps=0.1)
    start = {n: p.detach().clone() for n, p in learner.student.named_parameters()}
    omega = _train_with_si(term, learner, _batches(4, 2), momentum=0.0)
    fisher = {n: f.clone() for n, f in term.fisher.items()}
    assert term.omega() == {}  # no penalty before the first consolidation point
    term.consolidate()
    params = dict(learner.student.named_parameters())
    score = {n: omega[n] / (0.5 * fisher[n] * (params[n].detach() - start[n]).pow(2) + 0.1)
             for n in omega}
    _assert_close(term.score, score, rtol=1e-4, atol=1e-7)
    f_max = max(f.max() for f in fisher.values())
    s_max = max(s.clamp_min(0).max() for s in score.values())
    _assert_close(term.omega(), {n: fisher[n] / f_max + score[n].clamp_min(0) / s_max
                                 for n in fisher}, rtol=1e-4, atol=1e-7)
    # a second point averages the scores
    anchor = {n: p.detach().clone() for n, p in params.items()}
    omega2 = _train_with_si(term, learner, _batches(3, 3), momentum=0.0)
    fisher2 = {n: f.clone() for n, f in term.fisher.items()}
    term.consolidate()
    s2 = {n: omega2[n] / (0.5 * fisher2[n] * (params[n].detach() - anchor[n]).pow(2) + 0.1)
          for n in omega2}
    _assert_close(term.score, {n: 0.5 * (score[n] + s2[n]) for n in s2}, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("slices", [3, 12])  # fewer slices than classes, and more (Jacobian)
def test_scp_gamma_matches_an_explicit_loop_over_slices(slices):
    model = _tiny_model()
    x = torch.randn(6, 1, 6, 6)
    xi = random_unit_vectors(np.random.default_rng(1), slices, 4)
    assert torch.allclose(xi.norm(dim=1), torch.ones(slices))
    model.eval()
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for l in range(slices):
        model.zero_grad()
        (model(x).mean(dim=0) @ xi[l]).backward()
        for n, p in model.named_parameters():
            expected[n] += p.grad.pow(2) / slices
    model.train()
    _assert_close(sliced_cramer_importance(model, x, xi), expected, rtol=1e-4, atol=1e-8)


def test_scp_merges_with_alpha_the_weight_of_the_old_estimate():
    learner = _FakeLearner()
    learner.student.num_classes = 4
    term = SCP(learner, alpha=0.25, slices=5, samples=10)
    x1, x2 = torch.randn(4, 1, 6, 6), torch.randn(4, 1, 6, 6)
    y = torch.zeros(4, dtype=torch.long)
    term.after_backward(_step(x1, y))
    term.consolidate()
    first = {n: g.clone() for n, g in term.gamma.items()}
    state = copy.deepcopy(learner.rng.bit_generator.state)
    term.after_backward(_step(x2, y, 1))
    term.consolidate()
    learner.rng.bit_generator.state = state
    new = sliced_cramer_importance(learner.student, x2, random_unit_vectors(learner.rng, 5, 4))
    _assert_close(term.gamma, {n: 0.25 * first[n] + 0.75 * new[n] for n in new},
                  rtol=1e-4, atol=1e-8)


def test_penalty_is_half_the_capped_stiffness_times_squared_distance():
    learner = _FakeLearner(lr=0.5)  # cap 2
    term = MAS(learner, lam=3.0)
    params = dict(learner.student.named_parameters())
    term.importance = {n: torch.full_like(p, 0.5) for n, p in params.items()}
    term.importance["4.bias"] = torch.tensor([-1.0, 0.1, 10.0, 0.0])  # negative, small, capped
    term.set_anchor()
    with torch.no_grad():
        for p in learner.student.parameters():
            p += 1.0
    stiff = {n: (3.0 * w).clamp(0.0, 2.0) for n, w in term.importance.items()}
    expected = 0.5 * sum(s.sum() for s in stiff.values())  # distance 1 everywhere
    assert term.loss(Step()).item() == pytest.approx(expected.item(), rel=1e-6)
    assert stiff["4.bias"].tolist() == pytest.approx([0.0, 0.3, 2.0, 0.0])


# ------------------------------------------------------------------- in a live learner
def _stream(n_per_class=12, classes=(0, 1, 2)):
    """Real digits, centre 12x12 crops (a small, fast student), classes in order."""
    from edgecl.data import load_mnist5k
    x, y = load_mnist5k()
    keep = np.concatenate([np.flatnonzero(y == c)[:n_per_class] for c in classes])
    return np.ascontiguousarray(x[keep][:, :, 8:20, 8:20]), y[keep]


def _feed(learner, x, y, batch=6):
    out = []
    for i in range(0, len(x), batch):
        out.append(learner.learn_many(x[i:i + batch], y[i:i + batch].tolist())["loss"])
    return out


def _config(name, **kw):
    params = {"samples": 12} if "samples" in TERMS[name].defaults else {}
    if "fisher_every" in TERMS[name].defaults:
        params["fisher_every"] = 2
    if "slices" in TERMS[name].defaults:
        params["slices"] = 8
    return LearnerConfig(method=name, buffer_size=0, seed=0, lr=0.05, momentum=0.9,
                         consolidate_min_gap=1, threads=1, terms={name: {"lam": 5.0, **params}},
                        **kw)


@pytest.mark.parametrize("name", IMPORTANCE_TERMS)
def test_state_dict_round_trip_gives_the_same_next_losses(name):
    x, y = _stream()
    learner = OnlineLearner(_config(name))
    _feed(learner, x[:24], y[:24])  # classes 0 and 1, one consolidation point at class 1
    term = learner.terms[0]
    assert term.omega() and term.anchor  # there is something to save
    state = copy.deepcopy(learner.state_dict())
    expected = _feed(learner, x[24:], y[24:])  # class 2: a new point uses the saved window/path
    restored = OnlineLearner(LearnerConfig(method="finetune"))
    restored.load_state_dict(state)
    got = _feed(restored, x[24:], y[24:])
    assert got == pytest.approx(expected, rel=1e-5)
    for store in ("anchor", term.importance_store):
        _assert_close(getattr(restored.terms[0], store), getattr(term, store))


@pytest.mark.parametrize("name", IMPORTANCE_TERMS)
def test_works_after_the_head_grew(name):
    x, y = _stream(classes=(0, 1, 2, 3))
    learner = OnlineLearner(_config(name))
    losses = _feed(learner, x, y)  # the head grows 2 -> 3 -> 4, a point at each new class
    term = learner.terms[0]
    assert np.all(np.isfinite(losses)) and learner.skipped_steps == 0
    params = dict(learner.student.named_parameters())
    assert params["head.weight"].shape[0] == 4
    for store in term.zero_padded + term.param_padded:
        for n, v in getattr(term, store).items():
            assert v.shape == params[n].shape, (store, n)
    step = Step(index=learner.steps)
    before = term.loss(step).item()
    assert before > 0  # the penalty acts on the grown student
    # the newest class's head row was padded with zero importance (RWalk: zero path score;
    # its running Fisher has learned that row since), so moving it costs nothing
    padded = term.score if name == "rwalk" else term.omega()
    assert padded["head.weight"][-1].abs().max() == 0 and padded["head.bias"][-1] == 0
    if name != "rwalk":
        with torch.no_grad():
            params["head.weight"][-1] += 5.0
        assert term.loss(step).item() == pytest.approx(before, rel=1e-6)
    assert term.extra_bytes() > 0


def test_memory_bytes_counts_vectors_of_the_student_and_the_window():
    from edgecl.models import build_student
    student = build_student(10, 1, 28)
    n = sum(p.numel() for p in student.parameters())
    assert TERMS["ewcpp"].memory_bytes(student, (1, 28, 28), TERMS["ewcpp"].defaults) == 8 * n
    assert TERMS["si"].memory_bytes(student, (1, 28, 28), TERMS["si"].defaults) == 20 * n
    assert TERMS["ewc"].memory_bytes(student, (1, 28, 28), {"samples": 100}) == \
        8 * n + 100 * (784 + 8)


@pytest.mark.parametrize("per_batch,expected", [(False, [0, 2, 4, 6, 8]), (True, [0, 4, 8])])
def test_ewcpp_fisher_per_step_or_per_batch(digits, monkeypatch, per_batch, expected):
    """`fisher_every` counts steps, or with `fisher_per_batch` stream batches, the Fisher
    then taken on a batch's first step only (its other iterations see the same samples)."""
    import edgecl.learn.terms.ewcpp as ewcpp_module
    x, y = digits
    updated = []
    real = ewcpp_module.per_sample_fisher
    learner = OnlineLearner(LearnerConfig(
        method="ewcpp", iterations=2, buffer_size=0, seed=0,
        terms={"ewcpp": {"fisher_every": 2, "fisher_per_batch": per_batch}}))
    monkeypatch.setattr(ewcpp_module, "per_sample_fisher",
                        lambda m, xs, ys: (updated.append(learner.steps), real(m, xs, ys))[1])
    for i in range(0, 50, 10):
        learner.learn_many(x[i:i + 10], list(y[i:i + 10]))
    assert learner.steps == 10 and updated == expected
