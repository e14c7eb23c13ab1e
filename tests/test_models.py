import pytest
import torch

from edgecl.models import (GrowingLinear, build_student, build_teacher, count_macs,
                           count_params, stride_schedule)
from edgecl.learn.learner import _grow_head


def test_student_matches_mcunet_mbv2_w035():
    model = build_student(1000, 3, 144)
    assert count_params(model) == pytest.approx(0.75e6, rel=0.02)
    assert count_macs(model, (3, 144, 144)) == pytest.approx(23.5e6, rel=0.02)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].out_channels == 16 and convs[0].stride == (2, 2)
    assert convs[-1].out_channels == 448
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(bn.eps == 1e-3 for bn in bns)
    assert any(isinstance(m, torch.nn.ReLU6) for m in model.modules())
    assert isinstance(model.dropout, torch.nn.Dropout) and model.dropout.p == 0.2


@pytest.mark.parametrize("size,final", [(144, 5), (28, 4), (64, 4), (32, 4), (224, 7)])
def test_stride_rule_keeps_last_map_at_least_4(size, final):
    model = build_student(10, 1, size)
    h = model.body[:-2](model.normalize(torch.zeros(1, 1, size, size)))
    assert h.shape[-1] == final
    stem, stages = stride_schedule(size)
    if size >= 128:
        assert (stem, stages) == (2, [1, 2, 2, 2, 1, 2, 1])


def test_small_student_keeps_block_structure():
    small, large = build_student(10, 1, 28), build_student(10, 1, 144)
    shapes = lambda m: [p.shape for n, p in m.named_parameters() if "body.0" not in n]
    assert shapes(small) == shapes(large)


@pytest.mark.parametrize("name,blocks", [("resnet20", 9), ("resnet32", 15), ("resnet56", 27)])
def test_cifar_teachers(name, blocks):
    t = build_teacher(10, 1, 28, name)
    from torchvision.models.resnet import BasicBlock
    assert sum(isinstance(m, BasicBlock) for m in t.modules()) == blocks
    assert t(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_teacher_by_size_and_name():
    assert build_teacher(5, 1, 28).arch == "resnet20"
    big = build_teacher(5, 3, 144)
    assert big.arch == "resnet18" and big(torch.rand(1, 3, 144, 144)).shape == (1, 5)
    assert build_teacher(5, 1, 96, "resnet34")(torch.rand(1, 1, 96, 96)).shape == (1, 5)
    with pytest.raises(ValueError, match="unknown teacher"):
        build_teacher(5, 1, 28, "vgg")


def test_head_growth_keeps_old_outputs_and_optimizer_state():
    model = build_student(3, 1, 28).eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.rand(4, 1, 28, 28)
    model.train()
    torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    model.eval()
    before = model(x).detach()
    momentum_before = opt.state[model.head.weight]["momentum_buffer"].clone()
    _grow_head(model, opt, 5)
    after = model(x).detach()
    assert after.shape == (4, 5)
    torch.testing.assert_close(after[:, :3], before)
    assert any(p is model.head.weight for g in opt.param_groups for p in g["params"])
    moved = opt.state[model.head.weight]["momentum_buffer"]
    torch.testing.assert_close(moved[:3], momentum_before)
    assert torch.all(moved[3:] == 0)


def test_growing_linear_from_zero_outputs():
    head = GrowingLinear(8, 0)
    assert head(torch.rand(2, 8)).shape == (2, 0)
    head.grow(2)
    assert head(torch.rand(2, 8)).shape == (2, 2)
