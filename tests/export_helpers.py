"""Shared by the export and snapshot tests: a small student that actually classifies.

Training would take too long for a unit test, so the head is fitted in closed form: a
nearest-class-mean classifier on the (random, frozen) body's embeddings of an easy,
separable image set. That gives confident, well-separated logits, which is what the int8
gate needs to be meaningful.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgecl.models import build_student

SHAPE = (1, 16, 16)
CLASSES = 4
NAMES = [f"class-{k}" for k in range(CLASSES)]


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny graphs: a second torch thread only adds spin-waiting on a shared 2-core box.
    A test module uses it with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def blob_images(n_per_class: int, classes: int = CLASSES, shape=SHAPE, seed: int = 0):
    """uint8 noise with a bright square in a class-specific place; labels are strings."""
    rng = np.random.default_rng(seed)
    c, h, w = shape
    x = rng.integers(0, 60, size=(n_per_class * classes, c, h, w), dtype=np.uint8)
    y = np.repeat(np.arange(classes), n_per_class)
    side = h // 2
    for i, k in enumerate(y):
        top, left = (k // 2) * side, (k % 2) * side
        x[i, :, top + 1:top + side - 1, left + 1:left + side - 1] = rng.integers(
            180, 256, size=(c, side - 2, side - 2), dtype=np.uint8)
    order = rng.permutation(len(y))
    return x[order], [f"class-{k}" for k in y[order]]


def fitted_student(x: np.ndarray, labels: list, label_names: list, shape=SHAPE, seed: int = 0):
    """A student whose head is the nearest-class-mean classifier of x's embeddings."""
    torch.manual_seed(seed)
    model = build_student(len(label_names), shape[0], shape[1]).eval()
    with torch.no_grad():
        h = model.embed(torch.from_numpy(x).float() / 255)
        idx = torch.tensor([label_names.index(v) for v in labels])
        means = torch.stack([h[idx == k].mean(0) for k in range(len(label_names))])
        scale = 10.0 / means.norm(dim=1).mean() ** 2
        model.head.weight.copy_(2 * means * scale)
        model.head.bias.copy_(-(means ** 2).sum(1) * scale)
    return model


def misscale_int8(blob: bytes, factor: float, last_only: bool = True) -> bytes:
    """A deliberately damaged int8 model: the dequantization scale of the int8 weights (of the
    last weight tensor, the head, or of all of them) multiplied by `factor`, as a quantizer
    that got its scales wrong would leave it."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_from_string(blob)
    inits = {t.name: t for t in proto.graph.initializer}
    weight_dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"
                 and n.input[0] in inits
                 and inits[n.input[0]].data_type == onnx.TensorProto.INT8]
    for node in weight_dq[-1:] if last_only else weight_dq:
        scale = inits[node.input[1]]
        scaled = numpy_helper.to_array(scale).astype(np.float32) * np.float32(factor)
        scale.CopyFrom(numpy_helper.from_array(scaled, scale.name))
    return proto.SerializeToString()
