"""The memory report's liveness plan, on graphs small enough to plan by hand."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgecl.export.memory import memory_report

F32 = TensorProto.FLOAT


def model(nodes, inits=(), inputs=(("x", F32, ["N", 16]),), outputs=(("y", F32, ["N", 16]),)):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs], list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_chain_runs_in_place_and_batch_is_one():
    m = model([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Sigmoid", ["a"], ["y"])])
    r = memory_report(m)
    assert r.peak_activation_bytes == 64            # one 16-float buffer, reused
    assert r.peak_activation_bytes_no_inplace == 128  # input + output of one node
    assert r.weight_bytes == 0


def test_a_tensor_still_needed_later_is_not_overwritten():
    m = model([helper.make_node("Relu", ["x"], ["a"]),
               helper.make_node("Sigmoid", ["x"], ["b"]),   # x dies here: b may take its place
               helper.make_node("Add", ["a", "b"], ["y"])])
    r = memory_report(m)
    assert r.peak_activation_bytes == 128       # x and a (Relu cannot write over x)
    assert r.peak_activation_bytes_no_inplace == 192  # x, a, b while Sigmoid runs


def test_qdq_is_read_as_an_int8_runtime_runs_it():
    w = numpy_helper.from_array(np.ones((16, 16), np.int8), "w_q")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zp = numpy_helper.from_array(np.array(0, np.int8), "z")
    m = model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
               helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
               helper.make_node("DequantizeLinear", ["w_q", "s", "z"], ["wd"]),
               helper.make_node("MatMul", ["xd", "wd"], ["h"]),
               helper.make_node("QuantizeLinear", ["h", "s", "z"], ["hq"]),
               helper.make_node("DequantizeLinear", ["hq", "s", "z"], ["y"])],
              inits=[w, scale, zp])
    r = memory_report(m)
    assert r.weight_bytes == 256 + 4 + 1
    # Quantize(x): x (64 B float) and xq (16 B) live; then MatMul reads xq, writes hq (16 B).
    assert r.peak_activation_bytes == 64 + 16
    assert r.largest_tensor_bytes == 64
    assert r.num_nodes == 2  # Quantize(x) and MatMul; DequantizeLinear nodes are free


def test_accepts_serialized_bytes():
    m = model([helper.make_node("Relu", ["x"], ["y"])])
    assert memory_report(m.SerializeToString()).peak_activation_bytes == 64
    onnx.checker.check_model(m)
