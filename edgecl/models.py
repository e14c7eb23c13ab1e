"""The student (MobileNetV2-Tiny), the ResNet teachers, and the class-incremental head.

Every model here takes float input in [0, 1] (uint8 bytes / 255) and normalizes it inside
the graph, so an exported model carries its own preprocessing. Every model ends in a
`GrowingLinear` head that gains outputs when a label never seen before arrives.
"""
from __future__ import annotations

import copy
import math
from functools import partial
from typing import Sequence

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.ops.misc import Conv2dNormActivation

# MCUNet mbv2-w0.35: (expansion t, channels c, repeats n, stride s).
MBV2_TINY_SETTING = [
    (1, 8, 1, 1),
    (6, 8, 2, 2),
    (6, 16, 3, 2),
    (6, 24, 4, 2),
    (6, 32, 3, 1),
    (6, 56, 3, 2),
    (6, 112, 1, 1),
]
MBV2_TINY_STEM = 16
MBV2_TINY_MIX = 448
MIN_FINAL_MAP = 4  # smallest last feature map (pixels per side) the stride rule allows

SMALL_TEACHERS = {"resnet20": 3, "resnet32": 5, "resnet56": 9}
LARGE_TEACHERS = {"resnet18": tv_resnet.resnet18, "resnet34": tv_resnet.resnet34,
                  "resnet50": tv_resnet.resnet50}
TEACHERS = sorted([*SMALL_TEACHERS, *LARGE_TEACHERS])
SMALL_INPUT = 64  # below this side length, inputs count as small


class GrowingLinear(nn.Module):
    """A linear classifier whose output count grows; old rows are kept bit for bit."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        layer = nn.Linear(in_features, max(out_features, 1))
        self.weight = nn.Parameter(layer.weight.detach()[:out_features].clone())
        self.bias = nn.Parameter(layer.bias.detach()[:out_features].clone())

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)

    def grow(self, new_out: int) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """Add rows up to `new_out`. Returns (old params, new params) for optimizer surgery."""
        old_w, old_b = self.weight, self.bias
        extra = new_out - old_w.shape[0]
        if extra <= 0:
            return [], []
        fresh = nn.Linear(self.in_features, extra).to(old_w.device, old_w.dtype)
        self.weight = nn.Parameter(torch.cat([old_w.detach(), fresh.weight.detach()]))
        self.bias = nn.Parameter(torch.cat([old_b.detach(), fresh.bias.detach()]))
        return [old_w, old_b], [self.weight, self.bias]


class Normalize(nn.Module):
    """(x - mean) / std per channel, on input already scaled to [0, 1]."""

    def __init__(self, channels: int, mean: float = 0.5, std: float = 0.5):
        super().__init__()
        self.register_buffer("mean", torch.full((1, channels, 1, 1), float(mean)))
        self.register_buffer("std", torch.full((1, channels, 1, 1), float(std)))

    def forward(self, x):
        return (x - self.mean) / self.std


EMBEDDING = "embedding"  # the tap every model has: the flat body output the head reads


class EdgeNet(nn.Module):
    """normalize -> body (feature extractor to a flat embedding) -> dropout -> growing head.

    Named taps give distillation terms intermediate features through one mechanism:
    `forward(x, taps=("stage2", "embedding"))` returns `(logits, {name: tensor})`. Every
    model has the same tap names (`tap_names()`): `stage1` < `stage2` < `stage3` feature maps
    of increasing depth (the last is the map just before pooling) and `embedding`, so a term
    can ask the student, the anchor and the teacher for the same names. Taps are forward
    hooks attached only for that call: `forward(x)` without taps runs no hook at all.
    """

    def __init__(self, body: nn.Module, embed_dim: int, num_classes: int, in_channels: int,
                 dropout: float = 0.0, arch: str = "", tap_points: dict[str, str] | None = None):
        super().__init__()
        self.arch = arch
        self.normalize = Normalize(in_channels)
        self.body = body
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = GrowingLinear(embed_dim, num_classes)
        self.tap_points = dict(tap_points or {})  # tap name -> submodule whose output it is

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(x))

    def tap_names(self) -> list[str]:
        return [*self.tap_points, EMBEDDING]

    def forward(self, x: torch.Tensor, taps: Sequence[str] = ()):
        if not taps:
            return self.head(self.dropout(self.embed(x)))
        unknown = [t for t in taps if t != EMBEDDING and t not in self.tap_points]
        if unknown:
            raise ValueError(f"{self.arch}: unknown tap(s) {', '.join(unknown)}; "
                             f"known: {', '.join(self.tap_names())}")
        maps: dict[str, torch.Tensor] = {}
        hooks = [self.get_submodule(self.tap_points[name]).register_forward_hook(
                     partial(_keep_output, maps, name))
                 for name in taps if name != EMBEDDING]
        try:
            h = self.embed(x)
        finally:
            for hook in hooks:
                hook.remove()
        if EMBEDDING in taps:
            maps[EMBEDDING] = h
        return self.head(self.dropout(h)), maps


def _keep_output(store: dict, name: str, _module, _inputs, output) -> None:
    store[name] = output


def frozen_copy(model: EdgeNet, num_classes: int | None = None) -> EdgeNet:
    """A frozen twin for distillation (the anchor): no gradients, dropout off, and BatchNorm
    normalizing with the batch's own statistics without updating its running ones. So at
    the moment it is taken its features equal the training student's on the same batch,
    and a distillation loss measures only how far the weights moved since. `num_classes`
    narrows the head (a restored anchor is narrower than the student that grew since)."""
    twin = copy.deepcopy(model)
    if num_classes is not None:
        twin.head.weight = nn.Parameter(twin.head.weight.detach()[:num_classes].clone())
        twin.head.bias = nn.Parameter(twin.head.bias.detach()[:num_classes].clone())
    twin.eval()
    for p in twin.parameters():
        p.requires_grad_(False)
    for m in twin.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
            m.track_running_stats = False  # batch statistics, running ones left untouched
    return twin


def stride_schedule(image_size: int, min_final_map: int = MIN_FINAL_MAP,
                    relax: str = "early") -> tuple[int, list[int]]:
    """Stem stride and per-stage strides for an input of side `image_size`.

    Rule: start from MCUNet's exact strides (total 32). While the last feature map would be
    smaller than `min_final_map` pixels a side, turn one stride-2 layer into stride 1:
    the earliest remaining one (`relax="early"`, the default: stem first, then stage 2...)
    or the latest (`"late"`). Blocks and channels never change. 144 px: unchanged (5x5).
    28 px, early: the stem and stage 2 go to stride 1; total stride 8, last map 4x4, 11.3 M
    MACs. 28 px, late: stages 4 and 6 go to stride 1; also 4x4 and only 4.8 M MACs, but it
    lost about 20 points on Split-MNIST: thin early layers need the resolution more.
    """
    if relax not in ("late", "early"):
        raise ValueError("relax must be 'late' or 'early'")
    strides = [2] + [s for (_, _, _, s) in MBV2_TINY_SETTING]
    while math.ceil(image_size / math.prod(strides)) < min_final_map and 2 in strides:
        i = strides.index(2) if relax == "early" else len(strides) - 1 - strides[::-1].index(2)
        strides[i] = 1
    return strides[0], strides[1:]


def build_student(num_classes: int, in_channels: int = 3, image_size: int = 144,
                  dropout: float = 0.2, min_final_map: int = MIN_FINAL_MAP,
                  relax: str = "early", bn_momentum: float = 0.1) -> EdgeNet:
    """MobileNetV2-Tiny (MCUNet mbv2-w0.35), from torchvision's MobileNetV2 blocks."""
    norm = partial(nn.BatchNorm2d, eps=1e-3, momentum=bn_momentum)
    stem_stride, stage_strides = stride_schedule(image_size, min_final_map, relax)
    layers: list[nn.Module] = [Conv2dNormActivation(
        in_channels, MBV2_TINY_STEM, kernel_size=3, stride=stem_stride, norm_layer=norm,
        activation_layer=nn.ReLU6)]
    channels = MBV2_TINY_STEM
    stage_ends = []
    for (t, c, n, _), s in zip(MBV2_TINY_SETTING, stage_strides):
        for i in range(n):
            layers.append(InvertedResidual(channels, c, s if i == 0 else 1, t, norm_layer=norm))
            channels = c
        stage_ends.append(len(layers) - 1)
    layers.append(Conv2dNormActivation(channels, MBV2_TINY_MIX, kernel_size=1, norm_layer=norm,
                                       activation_layer=nn.ReLU6))
    body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    _init_like_torchvision(body)
    # taps: ends of the 16- and 32-channel stages, and the 448-channel map before pooling
    taps = {"stage1": f"body.{stage_ends[2]}", "stage2": f"body.{stage_ends[4]}",
            "stage3": f"body.{len(layers) - 1}"}
    net = EdgeNet(body, MBV2_TINY_MIX, num_classes, in_channels, dropout, arch="mbv2-tiny",
                  tap_points=taps)
    nn.init.normal_(net.head.weight, 0, 0.01)
    nn.init.zeros_(net.head.bias)
    return net


def _init_like_torchvision(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def default_teacher(image_size: int) -> str:
    return "resnet20" if image_size < SMALL_INPUT else "resnet18"


def build_teacher(num_classes: int, in_channels: int = 3, image_size: int = 144,
                  name: str | None = None) -> EdgeNet:
    """A ResNet teacher: CIFAR-style ResNet-20/32/56 for small inputs, torchvision's
    ResNet-18/34/50 for large ones. `name` picks one explicitly."""
    name = name or default_teacher(image_size)
    if name in SMALL_TEACHERS:
        blocks = SMALL_TEACHERS[name]
        body, dim = _cifar_resnet(blocks, in_channels), 64
        taps = {f"stage{k}": f"body.{2 + k * blocks}" for k in (1, 2, 3)}  # after stem (3)
    elif name in LARGE_TEACHERS:
        tv = LARGE_TEACHERS[name](weights=None)
        if in_channels != 3:
            tv.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
            nn.init.kaiming_normal_(tv.conv1.weight, mode="fan_out", nonlinearity="relu")
        dim = tv.fc.in_features
        tv.fc = nn.Identity()
        body = tv
        taps = {"stage1": "body.layer2", "stage2": "body.layer3", "stage3": "body.layer4"}
    else:
        raise ValueError(f"unknown teacher {name!r}; choose one of {', '.join(TEACHERS)}")
    return EdgeNet(body, dim, num_classes, in_channels, 0.0, arch=name, tap_points=taps)


def _cifar_resnet(blocks_per_stage: int, in_channels: int) -> nn.Sequential:
    """He et al.'s CIFAR ResNet (6n+2 layers): three stages of BasicBlocks, 16/32/64 wide."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False),
                               nn.BatchNorm2d(16), nn.ReLU(inplace=True)]
    inp = 16
    for width, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(blocks_per_stage):
            s = stride if i == 0 else 1
            down = None
            if s != 1 or inp != width:
                down = nn.Sequential(nn.Conv2d(inp, width, 1, s, bias=False), nn.BatchNorm2d(width))
            layers.append(tv_resnet.BasicBlock(inp, width, s, down))
            inp = width
    body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    for m in body.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return body


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers: what one more copy of it holds."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass on one sample of `input_shape` (C, H, W).
    Counts convolutions and linear layers, the convention MCUNet's 23.5 M follows."""
    total = 0

    def conv_hook(m, _inp, out):
        nonlocal total
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        total += out.numel() * k

    def linear_hook(m, inp, out):
        nonlocal total
        total += inp[0].shape[-1] * out.numel()

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, (nn.Linear, GrowingLinear)):
            hooks.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return total
