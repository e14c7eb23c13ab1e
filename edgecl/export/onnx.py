"""Export the student to ONNX (fp32 and int8) and check parity before anything is published.

The exported graph takes what the sensor sends: raw uint8 bytes (N, C, H, W) with the /255
folded in, or float32 in [0, 1]. The student normalizes (x - mean) / std inside its own graph,
so a device feeds sensor data as is. The contract is written into the model's metadata_props.

Exporter: torch's TorchScript-based exporter (`dynamo=False`). It needs no extra dependency,
exports this student in well under a second, and folds BatchNorm into the convolutions. The
dynamo exporter would add onnxscript and take several seconds per snapshot.

int8: static QDQ quantization by onnxruntime (S8S8, per-channel weights, MinMax calibration)
after its `quant_pre_process`, calibrated on replay-buffer samples: the data the student must
keep working on.
"""
from __future__ import annotations

import copy
import io
import json
import logging
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                      QuantType, quant_pre_process, quantize_static)
from torch import nn

from edgecl import __version__
from edgecl.errors import UserError
from edgecl.export.gate import DEFAULT_ALPHA, judge_accuracy, judge_agreement
from edgecl.export.memory import memory_report

OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
INPUT_DTYPES = ("uint8", "float32")
MAX_CALIBRATION = 128     # samples fed to the int8 calibrator
MAX_HELDOUT = 256         # held-out samples the gate uses (a seeded, class-balanced subset)
MAX_PARITY_EXTRA = 32     # buffer samples added to the parity set, so it is never empty
MAX_TORCH_PARITY = 64     # samples on which fp32 ONNX is compared with torch eager
CALIBRATION_BATCH = 32


@dataclass(frozen=True)
class ParityThresholds:
    """When an int8 / fp32 pair is good enough to publish."""

    max_abs_logit: float = 1e-3    # fp32 ONNX vs torch
    min_int8_agreement: float = 0.98  # int8 top-1 == fp32 top-1, fraction of the parity set
    max_accuracy_drop: float = 0.01   # fp32 - int8 held-out accuracy (fraction, 0.01 = 1 point)
    alpha: float = DEFAULT_ALPHA      # the int8 checks reject only on evidence at this level


@dataclass
class ParityReport:
    """The gate's measurements. `failures` names every check that failed; empty = pass."""

    n_parity: int            # samples in the int8 vs fp32 comparison
    n_torch: int             # of those, samples compared against torch eager
    n_heldout: int
    max_abs_logit_diff: float
    fp32_top1_match: float
    int8_agreement: float
    accuracy_fp32: float | None
    accuracy_int8: float | None
    per_class_fp32: dict = field(default_factory=dict)
    per_class_int8: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)
    failures: list = field(default_factory=list)
    checks: dict = field(default_factory=dict)  # int8 check -> figures, verdict and reason
    int8_failures: list = field(default_factory=list)  # the part of `failures` about int8

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def fp32_passed(self) -> bool:
        """The fp32 model alone may be published: every failure is one of int8's."""
        return all(f in self.int8_failures for f in self.failures)

    def as_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed, "fp32_passed": self.fp32_passed}


@dataclass
class ExportResult:
    """Both model files as bytes plus everything the snapshot metadata needs."""

    fp32: bytes
    int8: bytes
    labels: list
    input_spec: dict
    normalization: dict
    parity: ParityReport
    memory: dict          # file name -> MemoryReport.as_dict()
    seconds: dict         # export / quantize / parity wall time

    @property
    def passed(self) -> bool:
        return self.parity.passed

    @property
    def fp32_passed(self) -> bool:
        return self.parity.fp32_passed


class _SensorInput(nn.Module):
    """Wraps the student so the graph takes sensor data: uint8 bytes are cast and scaled."""

    def __init__(self, model: nn.Module, input_dtype: str):
        super().__init__()
        self.model = model
        self.raw = input_dtype == "uint8"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.raw:
            x = x.to(torch.float32) / 255.0
        return self.model(x)


def copy_model(model: nn.Module) -> nn.Module:
    """A detached CPU eval-mode copy: export never touches the live student."""
    clone = copy.deepcopy(model).cpu().eval().to(memory_format=torch.contiguous_format)
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


def to_model_input(x: np.ndarray, input_dtype: str) -> np.ndarray:
    """Samples as the exported graph takes them (the buffer may hold either dtype)."""
    x = np.asarray(x)
    if input_dtype == "uint8":
        if x.dtype == np.uint8:
            return np.ascontiguousarray(x)
        return np.clip(np.rint(x.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray(x, dtype=np.float32)


def torch_logits(model: nn.Module, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """The reference: the torch model on the same input the ONNX graph gets."""
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            t = torch.from_numpy(np.ascontiguousarray(x[i:i + batch]))
            t = t.to(torch.float32) / 255.0 if t.dtype == torch.uint8 else t
            outs.append(model(t).numpy())
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def normalization_of(model: nn.Module) -> dict:
    """mean/std the student applies in-graph to [0, 1] input (identity if it has none)."""
    norm = getattr(model, "normalize", None)
    if norm is None or not hasattr(norm, "mean"):
        return {"in_graph": False, "mean": None, "std": None}
    return {"in_graph": True, "applied_to": "input scaled to [0, 1]",
            "mean": [float(v) for v in norm.mean.flatten()],
            "std": [float(v) for v in norm.std.flatten()]}


def input_spec_of(input_shape: Sequence[int], input_dtype: str) -> dict:
    c, h, w = (int(v) for v in input_shape)
    scale = "x / 255 in graph" if input_dtype == "uint8" else "none: feed [0, 1]"
    return {"name": INPUT_NAME, "dtype": input_dtype, "shape": ["N", c, h, w], "layout": "NCHW",
            "range": [0, 255] if input_dtype == "uint8" else [0.0, 1.0], "scaling": scale,
            "output": OUTPUT_NAME}


def export_fp32(model: nn.Module, labels: Sequence, input_shape: Sequence[int],
                input_dtype: str = "uint8", compact: bool = True) -> bytes:
    """The student as an fp32 ONNX graph (opset 17, dynamic batch) taking sensor data.

    `compact=False` keeps torch's tensor names: onnxruntime's quantizer needs them (it
    mistakes short renamed weights for shared parameters)."""
    if input_dtype not in INPUT_DTYPES:
        raise UserError(f"input dtype {input_dtype!r}: expected one of {', '.join(INPUT_DTYPES)}")
    if len(input_shape) != 3:
        raise UserError(f"input shape {tuple(input_shape)}: expected (C, H, W)")
    model = copy_model(model)
    wrapped = _SensorInput(model, input_dtype).eval()
    dtype = torch.uint8 if input_dtype == "uint8" else torch.float32
    dummy = torch.zeros((2, *input_shape), dtype=dtype)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation and tracer notes
        torch.onnx.export(wrapped, (dummy,), buf, opset_version=OPSET, dynamo=False,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}},
                          do_constant_folding=True)
    proto = onnx.load_from_string(buf.getvalue())
    if compact:
        proto = compact_names(proto)
    _stamp(proto, labels, input_spec_of(input_shape, input_dtype), normalization_of(model),
           "fp32")
    return proto.SerializeToString()


def _stamp(proto: onnx.ModelProto, labels, input_spec: dict, normalization: dict,
           precision: str) -> None:
    """Write the preprocessing contract into metadata_props (replacing edgecl's own keys)."""
    props = {"edgecl.version": __version__, "edgecl.precision": precision,
             "edgecl.input": json.dumps(input_spec), "edgecl.normalization":
             json.dumps(normalization), "edgecl.labels": json.dumps(jsonable_labels(labels))}
    keep = [p for p in proto.metadata_props if p.key not in props]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = "edgecl"
    proto.producer_version = __version__
    proto.doc_string = ("edgecl student: input {dtype} {shape} {layout}; {scaling}; "
                        "normalization in graph; output logits over labels").format(**input_spec)


def compact_names(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Short tensor and node names, no value_info: torch's and onnxruntime's long generated
    names are ~15% of an int8 file, and bytes matter on a device. Graph I/O names stay."""
    g = proto.graph
    keep = {v.name for v in g.input} | {v.name for v in g.output}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        return names.setdefault(name, f"t{len(names)}")

    for t in g.initializer:
        t.name = short(t.name)
    del g.value_info[:]
    for i, node in enumerate(g.node):
        node.name = f"{node.op_type}_{i}"
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
    return proto


def jsonable_labels(labels: Sequence) -> list:
    """Labels as JSON can hold them (numpy ints become ints, everything else str)."""
    out = []
    for label in labels:
        if isinstance(label, (bool, np.bool_)):
            out.append(str(label))
        elif isinstance(label, (int, np.integer)):
            out.append(int(label))
        else:
            out.append(str(label))
    return out


def read_metadata(model: bytes | onnx.ModelProto) -> dict:
    """edgecl's metadata_props of a model file, JSON values decoded."""
    proto = onnx.load_from_string(model) if isinstance(model, (bytes, bytearray)) else model
    out = {}
    for p in proto.metadata_props:
        if p.key.startswith("edgecl."):
            key = p.key[len("edgecl."):]
            try:
                out[key] = json.loads(p.value)
            except json.JSONDecodeError:
                out[key] = p.value
    return out


class ArrayCalibrationReader(CalibrationDataReader):
    """Feeds calibration samples to onnxruntime's calibrator in fixed-size batches."""

    def __init__(self, x: np.ndarray, batch: int = CALIBRATION_BATCH):
        self.batches = [x[i:i + batch] for i in range(0, len(x), batch)]
        self.pos = 0

    def get_next(self):
        if self.pos >= len(self.batches):
            return None
        self.pos += 1
        return {INPUT_NAME: self.batches[self.pos - 1]}

    def rewind(self):
        self.pos = 0


def quantize_int8(fp32: bytes, calibration: np.ndarray) -> bytes:
    """Static QDQ int8 (S8S8, per-channel weights) of an exported fp32 graph.

    `calibration` must already be in the graph's input dtype (see `to_model_input`)."""
    if len(calibration) == 0:
        raise UserError("int8 export needs calibration samples: the replay buffer is empty")
    proto = onnx.load_from_string(fp32)
    meta = read_metadata(proto)
    # onnxruntime's quantizer logs each phase at INFO; a snapshot every N samples is not news.
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="edgecl-quant-") as tmp:
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(proto, str(pre))
        quantize_static(str(pre), str(out), ArrayCalibrationReader(calibration),
                        quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, per_channel=True,
                        calibrate_method=CalibrationMethod.MinMax,
                        # Logits stay float: an int8 logit grid turns near-ties into top-1
                        # flips (measured: int8/fp32 agreement 96.7% -> 97.1% on Split-MNIST).
                        extra_options={"OpTypesToExcludeOutputQuantization": ["Gemm"]})
        q = compact_names(onnx.load(str(out)))
    _stamp(q, meta.get("labels", []), meta["input"], meta["normalization"], "int8")
    return q.SerializeToString()


def session(model: bytes, threads: int = 1) -> ort.InferenceSession:
    """A CPU onnxruntime session over model bytes."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, x: np.ndarray, batch: int = 256) -> np.ndarray:
    outs = [sess.run(None, {INPUT_NAME: x[i:i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def check_parity(model: nn.Module, fp32: bytes, int8: bytes, heldout_x: np.ndarray,
                 heldout_y: np.ndarray, extra_x: np.ndarray, labels: Sequence,
                 thresholds: ParityThresholds = ParityThresholds(),
                 max_torch: int = MAX_TORCH_PARITY) -> ParityReport:
    """The publish gate, on the held-out samples plus `extra_x` (buffer samples, so the gate
    runs before anything was held out). Inputs are in the graph dtype; `heldout_y` holds
    class indices.

    fp32 ONNX vs torch is a property of the conversion, so it is measured on the first
    `max_torch` samples (torch eager is the slow part); int8 vs fp32 agreement on all of them;
    accuracy on the held-out slice alone."""
    parity_x = np.concatenate([heldout_x, extra_x])
    n_torch = min(len(parity_x), max_torch)
    ref = torch_logits(model, parity_x[:n_torch])
    f32 = run(session(fp32), parity_x)
    q8 = run(session(int8), parity_x)
    diff = float(np.max(np.abs(ref - f32[:n_torch]))) if n_torch else 0.0
    match = float(np.mean(ref.argmax(1) == f32[:n_torch].argmax(1))) if n_torch else 1.0
    agree = float(np.mean(q8.argmax(1) == f32.argmax(1))) if len(parity_x) else 1.0
    report = ParityReport(n_parity=len(parity_x), n_torch=n_torch, n_heldout=len(heldout_x),
                          max_abs_logit_diff=diff, fp32_top1_match=match, int8_agreement=agree,
                          accuracy_fp32=None, accuracy_int8=None)
    if len(parity_x) == 0:
        report.failures.append("no samples to check parity on")
    if diff > thresholds.max_abs_logit:
        report.failures.append(f"fp32 ONNX vs torch: max |dlogit| {diff:.2e} > "
                               f"{thresholds.max_abs_logit:.0e}")
    if match < 1.0:
        report.failures.append(f"fp32 ONNX vs torch: top-1 differs on {1 - match:.1%} of samples")
    agreement = judge_agreement(int(np.sum(q8.argmax(1) != f32.argmax(1))), len(parity_x),
                                thresholds.min_int8_agreement, thresholds.alpha)
    _record(report, "agreement", agreement)
    if len(heldout_x) == 0:
        report.skipped.append("accuracy: the held-out slice is empty")
        return report
    n = len(heldout_x)
    f32_h, q8_h = f32[:n].argmax(1), q8[:n].argmax(1)
    report.accuracy_fp32 = float(np.mean(f32_h == heldout_y))
    report.accuracy_int8 = float(np.mean(q8_h == heldout_y))
    names = jsonable_labels(labels)
    for k in np.unique(heldout_y):
        mask = heldout_y == k
        report.per_class_fp32[str(names[k])] = float(np.mean(f32_h[mask] == k))
        report.per_class_int8[str(names[k])] = float(np.mean(q8_h[mask] == k))
    _record(report, "accuracy", judge_accuracy(f32_h == heldout_y, q8_h == heldout_y,
                                               thresholds.max_accuracy_drop, thresholds.alpha))
    return report


def _record(report: ParityReport, name: str, figures: dict) -> None:
    report.checks[name] = figures
    if figures["verdict"] == "reject":
        report.failures.append(figures["reason"])
        report.int8_failures.append(figures["reason"])


def label_indices(labels: Sequence, y: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Map raw held-out labels to head indices; returns (indices, mask of known labels)."""
    index = {str(k): i for i, k in enumerate(jsonable_labels(labels))}
    keys = [str(v) for v in jsonable_labels(list(y))]
    known = np.array([k in index for k in keys], dtype=bool)
    return np.array([index[k] for k in keys if k in index], dtype=np.int64), known


def export_student(model: nn.Module, labels: Sequence, input_shape: Sequence[int],
                   calibration: np.ndarray, heldout_x: np.ndarray | None = None,
                   heldout_y: Sequence | None = None, input_dtype: str | None = None,
                   thresholds: ParityThresholds = ParityThresholds(),
                   seed: int = 0) -> ExportResult:
    """Export fp32 + int8, measure parity and memory. Nothing is written to disk.

    `calibration`: replay-buffer samples (uint8 or float32, (N, C, H, W)).
    `heldout_x`, `heldout_y`: the held-out slice; `heldout_y` holds raw labels (as in
    `labels`), and samples whose label the student has no output for are left out.
    `input_dtype`: what the device will feed; defaults to the calibration array's dtype.
    """
    t0 = time.perf_counter()
    model = copy_model(model)
    calibration = np.asarray(calibration)
    if calibration.ndim != 4 or tuple(calibration.shape[1:]) != tuple(input_shape):
        raise UserError(f"calibration samples have shape {calibration.shape[1:]}, "
                        f"expected {tuple(input_shape)}")
    if len(labels) != _num_outputs(model, input_shape):
        raise UserError(f"{len(labels)} labels for a model with "
                        f"{_num_outputs(model, input_shape)} outputs")
    input_dtype = input_dtype or ("uint8" if calibration.dtype == np.uint8 else "float32")
    rng = np.random.default_rng(seed)
    if len(calibration) > MAX_CALIBRATION:
        calibration = calibration[np.sort(rng.choice(len(calibration), MAX_CALIBRATION,
                                                     replace=False))]
    calib = to_model_input(calibration, input_dtype)
    if heldout_x is None or len(heldout_x) == 0:
        hx = np.zeros((0, *input_shape), dtype=calib.dtype)
        hy = np.zeros(0, dtype=np.int64)
    else:
        hy, known = label_indices(labels, heldout_y)
        hx = np.asarray(heldout_x)[known]
        if len(hx) > MAX_HELDOUT:
            keep = _balanced_subset(hy, MAX_HELDOUT, rng)
            hx, hy = hx[keep], hy[keep]
        hx = to_model_input(hx, input_dtype)
    named = export_fp32(model, labels, input_shape, input_dtype, compact=False)
    fp32 = compact_names(onnx.load_from_string(named)).SerializeToString()
    t1 = time.perf_counter()
    int8 = quantize_int8(named, calib)
    t2 = time.perf_counter()
    parity = check_parity(model, fp32, int8, hx, hy, calib[:MAX_PARITY_EXTRA], labels,
                          thresholds)
    t3 = time.perf_counter()
    memory = {"model.onnx": memory_report(fp32).as_dict(),
              "model.int8.onnx": memory_report(int8).as_dict()}
    t4 = time.perf_counter()
    return ExportResult(fp32=fp32, int8=int8, labels=jsonable_labels(labels),
                        input_spec=input_spec_of(input_shape, input_dtype),
                        normalization=normalization_of(model), parity=parity, memory=memory,
                        seconds={"export": t1 - t0, "quantize": t2 - t1, "parity": t3 - t2,
                                 "memory": t4 - t3, "total": t4 - t0})


def _balanced_subset(y: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of at most n samples, as even across classes as the counts allow."""
    order = rng.permutation(len(y))
    rank = np.zeros(len(y), dtype=np.int64)  # position of each sample within its class
    seen: dict[int, int] = {}
    for i in order:
        rank[i] = seen.get(int(y[i]), 0)
        seen[int(y[i])] = rank[i] + 1
    return np.sort(order[np.argsort(rank[order], kind="stable")[:n]])


def _num_outputs(model: nn.Module, input_shape: Sequence[int]) -> int:
    head = getattr(model, "head", None)
    if head is not None and hasattr(head, "out_features"):
        return int(head.out_features)
    with torch.no_grad():
        return int(model(torch.zeros(1, *input_shape)).shape[1])
