"""Export to ONNX: the contract in the graph, parity with torch, the int8 gate."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from edgecl.errors import UserError
from edgecl.export.onnx import (ParityThresholds, check_parity, export_fp32, export_student,
                                label_indices, quantize_int8, read_metadata, run, session,
                                to_model_input, torch_logits)
from export_helpers import (CLASSES, NAMES, SHAPE, blob_images, fitted_student,  # noqa: F401
                            misscale_int8, one_torch_thread)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained():
    x, y = blob_images(24, seed=0)
    model = fitted_student(x, y, NAMES)
    hx, hy = blob_images(15, seed=1)
    return model, x, y, hx, hy


@pytest.fixture(scope="module")
def exported(trained):
    model, x, _, hx, hy = trained
    return export_student(model, NAMES, SHAPE, x, hx, hy)


def test_fp32_graph_takes_uint8_with_dynamic_batch_and_matches_torch(trained, exported):
    model, x, _, _, _ = trained
    proto = onnx.load_from_string(exported.fp32)
    assert proto.opset_import[0].version >= 17
    inp = proto.graph.input[0].type.tensor_type
    assert inp.elem_type == onnx.TensorProto.UINT8
    assert inp.shape.dim[0].dim_param and [d.dim_value for d in inp.shape.dim[1:]] == list(SHAPE)
    sess = session(exported.fp32)
    for n in (1, 7):  # the batch axis really is dynamic
        ours = sess.run(None, {"input": x[:n]})[0]
        ref = torch_logits(model, x[:n])
        assert ours.shape == (n, CLASSES)
        assert np.max(np.abs(ours - ref)) <= 1e-3
        assert (ours.argmax(1) == ref.argmax(1)).all()


def test_metadata_records_the_preprocessing_contract(exported):
    for blob, precision in ((exported.fp32, "fp32"), (exported.int8, "int8")):
        meta = read_metadata(blob)
        assert meta["precision"] == precision
        assert meta["labels"] == NAMES
        assert meta["input"]["dtype"] == "uint8"
        assert meta["input"]["shape"] == ["N", *SHAPE]
        assert meta["normalization"]["in_graph"] is True
        assert meta["normalization"]["mean"] == [0.5] and meta["normalization"]["std"] == [0.5]


def test_gate_passes_for_a_good_export_and_int8_is_smaller(exported):
    p = exported.parity
    assert p.passed, p.failures
    assert p.max_abs_logit_diff <= 1e-3 and p.fp32_top1_match == 1.0
    assert p.int8_agreement >= 0.98
    assert p.n_heldout == 15 * CLASSES
    assert set(p.per_class_int8) == set(NAMES)
    assert len(exported.int8) < 0.45 * len(exported.fp32)
    int8_nodes = {n.op_type for n in onnx.load_from_string(exported.int8).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= int8_nodes


def test_float32_variant_takes_unit_range_input(trained):
    model, x, _, _, _ = trained
    fx = to_model_input(x[:5], "float32")
    blob = export_fp32(model, NAMES, SHAPE, input_dtype="float32")
    assert read_metadata(blob)["input"]["dtype"] == "float32"
    out = session(blob).run(None, {"input": fx})[0]
    assert np.max(np.abs(out - torch_logits(model, fx))) <= 1e-3


def test_gate_catches_an_export_that_does_not_match_the_model(trained, exported):
    """The torch model changed after export (as if weights raced the copy): gate fails."""
    model, x, _, hx, hy = trained
    drifted = fitted_student(x, blob_images(24, seed=0)[1], NAMES, seed=1)  # other body
    y_idx, _ = label_indices(NAMES, hy)
    report = check_parity(drifted, exported.fp32, exported.int8, hx, y_idx, x[:8], NAMES)
    assert not report.passed
    assert any("max |dlogit|" in f for f in report.failures)


def test_gate_thresholds_are_applied(trained, exported):
    """A wrongly scaled int8 model fails the default gate, and passes once the limits allow
    its drop (limit) or demand more evidence than 60 samples give (alpha)."""
    model, x, _, hx, hy = trained
    y_idx, _ = label_indices(NAMES, hy)
    damaged = misscale_int8(exported.int8, 0.8)
    def failures(**kw):
        return check_parity(model, exported.fp32, damaged, hx, y_idx, x[:8], NAMES,
                            ParityThresholds(**kw)).failures
    assert len(failures()) == 2
    assert failures(min_int8_agreement=0.0, max_accuracy_drop=0.9) == []
    assert failures(alpha=1e-60) == []


def test_export_works_on_a_copy(trained):
    model = trained[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    export_fp32(model, NAMES, SHAPE)
    assert model.training  # mode of the live model untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()


def test_user_mistakes_are_user_errors(trained):
    model, x, _, _, _ = trained
    with pytest.raises(UserError, match="labels"):
        export_student(model, NAMES[:2], SHAPE, x)
    with pytest.raises(UserError, match="shape"):
        export_student(model, NAMES, (1, 8, 8), x)
    with pytest.raises(UserError, match="calibration"):
        quantize_int8(export_fp32(model, NAMES, SHAPE), x[:0])


def test_heldout_labels_unknown_to_the_model_are_left_out():
    idx, known = label_indices(["a", 3], ["a", "zzz", 3, np.int64(3)])
    assert idx.tolist() == [0, 1, 1] and known.tolist() == [True, False, True, True]


def test_run_batches_match_one_call(exported, trained):
    _, x, _, _, _ = trained
    sess = session(exported.int8)
    assert np.array_equal(run(sess, x, batch=16), sess.run(None, {"input": x})[0])
