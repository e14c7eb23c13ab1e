"""Named taps on every model, and the anchor the learner keeps for distillation terms."""
import pytest
import torch

from edgecl.learn import LearnerConfig, OnlineLearner
from edgecl.models import EdgeNet, build_student, build_teacher, frozen_copy
from stream_helpers import learn_in_batches as _learn, template_stream as _stream

TAPS = ["stage1", "stage2", "stage3", "embedding"]


def _no_hooks_left(model):
    return all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("build,shape", [
    (lambda: build_student(3, 1, 12), (1, 12, 12)),
    (lambda: build_student(3, 3, 144), (3, 144, 144)),
    (lambda: build_teacher(3, 1, 12, "resnet20"), (1, 12, 12)),
    (lambda: build_teacher(3, 3, 64, "resnet18"), (3, 64, 64)),
])
def test_every_model_has_the_same_tap_names(build, shape):
    model = build().eval()
    assert model.tap_names() == TAPS
    x = torch.rand(2, *shape)
    logits, maps = model(x, TAPS)
    torch.testing.assert_close(logits, model(x))  # taps change nothing about the output
    assert list(maps) == TAPS
    assert [maps[t].dim() for t in TAPS] == [4, 4, 4, 2]
    assert maps["stage1"].shape[1] < maps["stage2"].shape[1] < maps["stage3"].shape[1]
    assert maps["stage3"].shape[1] == maps["embedding"].shape[1]  # last map, before pooling
    assert _no_hooks_left(model)


def test_unknown_tap_is_named():
    with pytest.raises(ValueError, match="unknown tap.*stage9.*known: stage1"):
        build_student(2, 1, 12)(torch.rand(1, 1, 12, 12), ("stage9",))


def test_frozen_copy_matches_the_training_student_and_stays_frozen():
    model = build_student(4, 1, 12)
    model.train()
    x = torch.rand(6, 1, 12, 12)
    model(x)  # move the running statistics off their initial values
    twin = frozen_copy(model, num_classes=2)
    assert all(not p.requires_grad for p in twin.parameters())
    assert twin.head.out_features == 2
    before = {k: v.clone() for k, v in twin.state_dict().items()}
    _, student_maps = model(x, TAPS)
    with torch.no_grad():
        logits, twin_maps = twin(x, TAPS)
    assert logits.shape == (6, 2)
    for t in TAPS:  # same weights, same batch statistics: the same features
        torch.testing.assert_close(twin_maps[t], student_maps[t])
    for k, v in twin.state_dict().items():  # running statistics untouched
        torch.testing.assert_close(v, before[k])


def test_default_method_takes_no_taps_and_no_anchor(monkeypatch):
    calls = []
    forward = EdgeNet.forward

    def spy(self, x, taps=()):
        calls.append(tuple(taps))
        return forward(self, x, taps)

    monkeypatch.setattr(EdgeNet, "forward", spy)
    learner = OnlineLearner(LearnerConfig(method="derpp+ewcpp", buffer_size=20,
                                          consolidate_min_gap=1))
    x, y = _stream([0, 1, 2, 3])
    _learn(learner, x, y)
    assert learner.student_taps == () and not learner.needs_anchor
    assert learner.last_consolidation > 0 and learner.anchor is None
    assert calls and all(taps == () for taps in calls)
    assert learner.stats()["anchor_bytes"] == 0


def test_anchor_taken_at_consolidation_is_frozen_and_narrower():
    learner = OnlineLearner(LearnerConfig(method="pod", buffer_size=0, consolidate_min_gap=2,
                                          iterations=1))  # one step per batch: a gap of 2 is 2 batches
    assert learner.student_taps == ("stage1", "stage2", "stage3", "embedding")
    assert learner.anchor_taps == learner.student_taps and learner.needs_anchor
    x, y = _stream([0, 1])
    _learn(learner, x, y)
    assert learner.anchor is None  # no consolidation point yet
    x2, y2 = _stream([2, 3], seed=1)
    learner.learn_many(x2[:8], y2[:8])  # class 2 arrives: consolidation, then growth
    anchor = learner.anchor
    assert anchor is not None and anchor.head.out_features == 2
    assert learner.student.head.out_features == 3
    assert all(not p.requires_grad for p in anchor.parameters())
    frozen = {k: v.clone() for k, v in anchor.state_dict().items()}
    _learn(learner, x2[8:], y2[8:])
    assert learner.anchor is anchor
    for k, v in anchor.state_dict().items():
        torch.testing.assert_close(v, frozen[k])
    assert learner.stats()["anchor_bytes"] > 0
    assert learner.stats()["terms_bytes"] >= learner.stats()["anchor_bytes"]


def test_teacher_taps_reach_the_step():
    learner = OnlineLearner(LearnerConfig(method="hints", teacher="online", buffer_size=0,
                                          terms={"hints": {"source": "teacher"}}))
    assert learner.teacher_taps == ("stage2",) and not learner.needs_anchor
    seen = {}
    term = learner.terms[0]
    loss = term.loss

    def spy(step):
        seen.update(step.teacher_features)
        return loss(step)

    term.loss = spy
    x, y = _stream([0, 1])
    _learn(learner, x, y)
    assert seen["stage2"].shape[1] == 32 and not seen["stage2"].requires_grad  # ResNet-20
    assert term.regressor.weight.shape[:2] == (32, 32)
    assert learner.anchor is None


@pytest.mark.parametrize("terms,teacher,match", [
    ({"hints": {"source": "teacher"}}, "none", "distills from the teacher"),
    ({"hints": {"source": "student"}}, "none", "source must be"),
])
def test_bad_source_is_a_clear_error(terms, teacher, match):
    with pytest.raises(ValueError, match=match):
        OnlineLearner(LearnerConfig(method="hints", teacher=teacher, terms=terms))
