"""Device budgets from an ONNX graph: weight bytes (flash) and peak activation memory (SRAM).

Peak activation memory comes from a liveness plan: walk the nodes in graph order, a tensor is
allocated when its producer runs and freed after its last consumer, and the peak is the largest
sum of live bytes while a node runs (its inputs and outputs both live). Two plans are reported:

- `peak_activation_bytes`: elementwise ops (Relu, Clip, Add, Sub, Div, ...) may write into an
  input of the same size that dies at that node, as arena planners (TFLite, TinyEngine) do;
  reshapes alias their input. A shrinking op (float -> int8 Quantize) gets a fresh buffer, so
  the large one is freed right after it rather than held.
- `peak_activation_bytes_no_inplace`: every node output gets fresh memory.

An int8 QDQ graph is read the way an int8 runtime executes it: DequantizeLinear nodes are free
(their consumer reads the int8 tensor), and a float tensor consumed only by QuantizeLinear is
never materialized (the producer writes int8). Weights fed through DequantizeLinear count as
weights, not activations. Batch size is 1.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

# Ops whose output can overwrite an input of equal or larger size.
ELEMENTWISE = {"Relu", "Clip", "Add", "Sub", "Mul", "Div", "Sigmoid", "HardSigmoid",
               "HardSwish", "LeakyRelu", "Cast", "QuantizeLinear", "DequantizeLinear"}
# Ops whose output is a view of the input: no new memory.
ALIASES = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"}


@dataclass
class MemoryReport:
    """What a device must hold: weights in flash, activations in SRAM (batch 1)."""

    weight_bytes: int
    peak_activation_bytes: int
    peak_activation_bytes_no_inplace: int
    peak_node: str           # the node running when the (in-place) peak is reached
    largest_tensor_bytes: int
    num_nodes: int

    def as_dict(self) -> dict:
        return asdict(self)


def memory_report(model: onnx.ModelProto | bytes) -> MemoryReport:
    """Weight bytes and liveness-planned peak activation memory of `model` at batch 1."""
    if isinstance(model, (bytes, bytearray)):
        model = onnx.load_from_string(bytes(model))
    model = _with_batch_one(model)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    weight_bytes = sum(numpy_helper.to_array(t).nbytes for t in inits.values())
    sizes = _tensor_sizes(model)
    nodes, outputs = _runtime_view(graph)
    inplace, peak_node, largest = _plan(nodes, graph, outputs, sizes, inits, inplace=True)
    no_inplace, _, _ = _plan(nodes, graph, outputs, sizes, inits, inplace=False)
    return MemoryReport(weight_bytes=int(weight_bytes), peak_activation_bytes=int(inplace),
                        peak_activation_bytes_no_inplace=int(no_inplace), peak_node=peak_node,
                        largest_tensor_bytes=int(largest), num_nodes=len(nodes))


def _with_batch_one(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose symbolic batch dims are 1, with every intermediate shape inferred."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = 1
    del model.graph.value_info[:]
    return shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)


def _tensor_sizes(model: onnx.ModelProto) -> dict[str, int]:
    """Bytes of every tensor whose shape and type are known."""
    sizes: dict[str, int] = {}
    g = model.graph
    for value in [*g.input, *g.value_info, *g.output]:
        t = value.type.tensor_type
        if not t.HasField("shape") or t.elem_type == 0:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if any(d is None for d in dims):
            continue
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)).itemsize
        sizes[value.name] = int(np.prod(dims, dtype=np.int64)) * itemsize
    return sizes


def _runtime_view(graph):
    """Nodes as an int8 runtime runs them, (op, name, inputs, outputs) with Q/DQ folded away,
    and the graph outputs' names in that view."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    alias: dict[str, str] = {}

    def resolve(name: str) -> str:
        while name in alias:
            name = alias[name]
        return name

    nodes = []
    for node in graph.node:
        if node.op_type == "DequantizeLinear":
            alias[node.output[0]] = node.input[0]  # consumer reads the int8 tensor directly
            continue
        outputs = list(node.output)
        if node.op_type != "QuantizeLinear":
            for i, out in enumerate(outputs):
                users = consumers.get(out, [])
                if len(users) == 1 and users[0].op_type == "QuantizeLinear":
                    # The producer writes the quantized tensor: the float one never exists.
                    outputs[i] = users[0].output[0]
                    alias[out] = users[0].output[0]
        elif resolve(node.input[0]) == node.output[0]:
            continue  # this Quantize was folded into its producer above
        inputs = [resolve(n) for n in node.input if n]
        nodes.append((node.op_type, node.name or node.output[0], inputs, outputs))
    return nodes, [resolve(out.name) for out in graph.output]


def _plan(nodes, graph, outputs, sizes, inits, inplace: bool):
    """Peak live bytes over the node sequence; returns (peak, node at peak, largest tensor)."""
    def is_activation(name: str) -> bool:
        return bool(name) and name not in inits and name in sizes

    last_use: dict[str, int] = {}
    for i, (_, _, inputs, _) in enumerate(nodes):
        for n in inputs:
            last_use[n] = i
    for out in outputs:
        last_use[out] = len(nodes)
    live: dict[str, int] = {}      # buffer -> bytes
    buffer_of: dict[str, str] = {}  # tensor -> buffer holding it
    free_after: dict[str, int] = {}  # buffer -> last node index reading any tensor in it
    for value in graph.input:
        if is_activation(value.name):
            live[value.name] = sizes[value.name]
            buffer_of[value.name] = value.name
            free_after[value.name] = last_use.get(value.name, -1)
    peak, peak_node = sum(live.values()), "input"
    largest = max(live.values(), default=0)
    for i, (op, name, inputs, outputs) in enumerate(nodes):
        acts_in = [n for n in inputs if is_activation(n) and n in buffer_of]
        for out in outputs:
            if not is_activation(out):
                continue
            size = sizes[out]
            largest = max(largest, size)
            target = None
            if op in ALIASES and acts_in:
                target = buffer_of[acts_in[0]]
            elif inplace and op in ELEMENTWISE:
                target = next((buffer_of[n] for n in acts_in
                               if free_after[buffer_of[n]] == i and live[buffer_of[n]] == size),
                              None)
            if target is None:
                target = out
                live[out] = size
                free_after[out] = -1
            buffer_of[out] = target
            free_after[target] = max(free_after[target], last_use.get(out, -1))
        current = sum(live.values())
        if current > peak:
            peak, peak_node = current, name
        for b in [b for b in live if free_after[b] <= i]:
            del live[b]
    return peak, peak_node, largest
