"""Snapshot export: sizes, export + quantize + parity time, inference latency, memory report.

    .venv/bin/python benchmarks/export.py [--write BENCHMARKS.md] [--every K]

1. Learns Split-MNIST (MNIST-5k, pairs (0,1) ... (8,9), the learner's defaults; `--every K`
   keeps every K-th digit of the stream) with a
   HeldOutSlice routing 1 in 20 samples per class away from training, as the daemon does.
2. Exports the student (10 classes, 1x28x28) from the replay buffer and the held-out slice,
   `--repeats` times, and reports sizes, timings and the parity gate.
3. Times single-image inference: onnxruntime int8 and fp32 beside torch eager.
4. Memory reports for the 28 px student and the default 3x144x144 student (MCUNet's
   mbv2-w0.35 at 144 px: 308 kB peak SRAM, published in MCUNet, Lin et al. 2020, Table 2).

`--write` replaces the export section of the file (between markers), leaving the rest.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgecl.data import split_mnist  # noqa: E402
from edgecl.export.heldout import HeldOutSlice  # noqa: E402
from edgecl.export.memory import memory_report  # noqa: E402
from edgecl.export.onnx import (copy_model, export_student, label_indices, run,  # noqa: E402
                                session, to_model_input)
from edgecl.learn import LearnerConfig, OnlineLearner  # noqa: E402
from edgecl.models import build_student  # noqa: E402
from sections import write_section  # noqa: E402  benchmarks/, the script's own folder

MCUNET_PEAK_KB = 308
TARGET_INT8_KB, TARGET_FP32_KB, TARGET_SECONDS = 450, 1400, 3.0


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}, onnxruntime "
            f"{__import__('onnxruntime').__version__}; load average {load:.1f} at start")


def learn(every: int):
    stream = split_mnist(0)
    xs, ys = stream.train_x[::every], stream.train_y[::every]
    n = len(xs)
    learner = OnlineLearner(LearnerConfig(seed=0))
    heldout = HeldOutSlice(every=20, per_class=20, seed=0)
    t0 = time.perf_counter()
    for start in range(0, n, 10):
        x, y = xs[start:start + 10], ys[start:start + 10].tolist()
        kept = heldout.offer(x, y)
        if (~kept).any():
            learner.learn_many(x[~kept], [v for v, k in zip(y, kept) if not k])
        if start % 500 == 0:
            print(f"  learned {start}/{n} samples", file=sys.stderr, flush=True)
    print(f"  learning took {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return learner, heldout, stream


def latency_ms(fn, x, repeats: int = 200) -> float:
    for _ in range(10):
        fn(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def kb(n: int) -> str:
    return f"{n / 1000:.1f} kB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", metavar="FILE", help="replace the export section of FILE")
    ap.add_argument("--every", type=int, default=1, metavar="K",
                    help="learn every K-th digit of the 4,000-digit stream (all 10 classes "
                         "still arrive; K=4 is quick on a busy machine)")
    ap.add_argument("--repeats", type=int, default=5, help="exports to time")
    ap.add_argument("--save", metavar="PT", help="also save the learned student, labels, buffer "
                                                  "and held-out slice (torch.save) for study")
    args = ap.parse_args()
    command = "python benchmarks/export.py " + " ".join(sys.argv[1:])
    where = machine()
    print("learning Split-MNIST ...", file=sys.stderr)
    learner, heldout, stream = learn(args.every)
    model, labels = learner.student, list(learner.labels)
    calib = learner.buffer.x[:len(learner.buffer)]
    hx, hy = heldout.arrays()
    if args.save:
        torch.save({"student": copy_model(model), "labels": labels, "calibration": calib,
                    "heldout": (hx, hy), "input_shape": learner.input_shape}, args.save)

    print("exporting ...", file=sys.stderr)
    results, seconds = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        results.append(export_student(model, labels, learner.input_shape, calib, hx, hy))
        seconds.append(time.perf_counter() - t)
    r = results[-1]
    p = r.parity
    parts = {k: statistics.median(res.seconds[k] for res in results)
             for k in ("export", "quantize", "parity", "memory")}

    # Accuracy on the 1,000 test digits, a larger slice than the gate's held-out set.
    ty, known = label_indices(labels, stream.test_y.tolist())
    tx = to_model_input(stream.test_x[known], "uint8")
    f32s, q8s = session(r.fp32), session(r.int8)
    f32_logits, q8_logits = run(f32s, tx), run(q8s, tx)
    test_f32 = float(np.mean(f32_logits.argmax(1) == ty))
    test_q8 = float(np.mean(q8_logits.argmax(1) == ty))
    flips = f32_logits.argmax(1) != q8_logits.argmax(1)
    test_agree = 1.0 - float(np.mean(flips))
    top2 = np.sort(f32_logits, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]  # fp32 top-1 minus top-2 logit
    margins = (f"median {np.median(margin):.3f} over all; "
               + (f"median {np.median(margin[flips]):.3f}, max {margin[flips].max():.3f} where "
                  f"int8 and fp32 disagree ({int(flips.sum())})" if flips.any()
                  else "no disagreements"))

    print("timing inference ...", file=sys.stderr)
    one = tx[:1]
    eager = copy_model(model)
    threads = torch.get_num_threads()

    def torch_eager(x):
        with torch.inference_mode():
            return eager(torch.from_numpy(x).float() / 255)

    lat = {"onnxruntime int8": latency_ms(lambda x: q8s.run(None, {"input": x}), one),
           "onnxruntime fp32": latency_ms(lambda x: f32s.run(None, {"input": x}), one),
           f"torch eager fp32 ({threads} threads)": latency_ms(torch_eager, one)}
    torch.set_num_threads(1)
    lat["torch eager fp32 (1 thread)"] = latency_ms(torch_eager, one)
    torch.set_num_threads(threads)

    print("pull over loopback ...", file=sys.stderr)
    pull = pull_over_loopback(r)

    print("memory report at 3x144x144 ...", file=sys.stderr)
    big = build_student(10, 3, 144)
    rng = np.random.default_rng(0)
    big_calib = rng.integers(0, 256, size=(32, 3, 144, 144), dtype=np.uint8)
    big_r = export_student(big, list(range(10)), (3, 144, 144), big_calib)
    mem = {("1x28x28", "fp32"): r.memory["model.onnx"], ("1x28x28", "int8"):
           r.memory["model.int8.onnx"], ("3x144x144", "fp32"): big_r.memory["model.onnx"],
           ("3x144x144", "int8"): big_r.memory["model.int8.onnx"]}

    lines = ["## Snapshot export (ONNX fp32 + int8)", "",
             f"Command: `{command}`  ", f"Machine: {where}.", "",
             f"Student: MobileNetV2-Tiny, {len(labels)} classes, input uint8 1x28x28, after "
             f"Split-MNIST ({learner.stats()['samples_learned']} samples learned: every "
             f"{args.every}{'st' if args.every == 1 else 'th'} digit of the stream, minus the "
             f"held-out slice; learner defaults); calibration on the {len(calib)}-sample replay buffer; held-out slice "
             f"{p.n_heldout} samples (1 in 20 per class, reservoir of 20 per class).", "",
             "| measure | measured | target |", "|---|---|---|",
             f"| int8 file (`model.int8.onnx`) | {len(r.int8):,} B ({kb(len(r.int8))}) | "
             f"≤ {TARGET_INT8_KB} KB |",
             f"| fp32 file (`model.onnx`) | {len(r.fp32):,} B ({kb(len(r.fp32))}) | "
             f"≤ {TARGET_FP32_KB / 1000:.1f} MB |",
             f"| export + quantize + parity + memory report, median of {len(seconds)} | "
             f"{statistics.median(seconds):.2f} s (min {min(seconds):.2f}, max "
             f"{max(seconds):.2f}) | ≤ {TARGET_SECONDS:.0f} s |",
             f"| of which: torch→ONNX / quantize (incl. calibration) / parity / memory | "
             + " / ".join(f"{parts[k]:.2f} s" for k in parts) + " | |",
             f"| fp32 ONNX vs torch, max \\|Δlogit\\| ({p.n_torch} samples) | "
             f"{p.max_abs_logit_diff:.2e} | ≤ 1e-3 |",
             f"| fp32 ONNX vs torch, top-1 identical | {p.fp32_top1_match:.1%} | 100 % |",
             f"| int8 vs fp32 top-1 agreement ({p.n_parity} samples) | {p.int8_agreement:.1%} "
             f"| ≥ 98 % |",
             f"| held-out accuracy fp32 / int8 ({p.n_heldout} samples) | "
             f"{_pct(p.accuracy_fp32)} / {_pct(p.accuracy_int8)} | drop ≤ 1 point |",
             f"| test-split accuracy fp32 / int8 ({len(ty):,} digits of the learned classes),"
             f" agreement | "
             f"{test_f32:.1%} / {test_q8:.1%}, {test_agree:.1%} | |",
             f"| fp32 top-1 − top-2 logit margin, test split | {margins} | |",
             f"| parity gate | {'passed' if p.passed else 'FAILED: ' + '; '.join(p.failures)}"
             f" | |", "",
             "Single-image latency (batch 1, median of 200 runs; onnxruntime with 1 intra-op "
             "thread, as the exporter's sessions use):", "",
             "| runtime | ms / image |", "|---|---|",
             *[f"| {k} | {v:.2f} |" for k, v in lat.items()], "",
             f"Pull over loopback (DeviceClient → in-process daemon, chunks of "
             f"{pull['chunk_kib']} KiB, credit {pull['credit']}, sha256 verified, atomic "
             f"install; median of {pull['runs']}): all three files "
             f"({pull['bytes_all']:,} B) {pull['all_ms']:.0f} ms; `--int8-only` "
             f"({pull['bytes_int8']:,} B) {pull['int8_ms']:.0f} ms.", "",
             "Memory report (batch 1; liveness plan over the ONNX graph's tensor sizes, "
             "in-place elementwise ops; `no in-place` gives every output fresh memory):", "",
             "| input | model | weights | peak activations | no in-place | largest tensor | "
             "peak at |",
             "|---|---|---|---|---|---|---|",
             *[f"| {s} | {m} | {kb(v['weight_bytes'])} | {kb(v['peak_activation_bytes'])} | "
               f"{kb(v['peak_activation_bytes_no_inplace'])} | {kb(v['largest_tensor_bytes'])} | "
               f"`{v['peak_node']}` |" for (s, m), v in mem.items()],
             f"| 3x144x144 | MCUNet mbv2-w0.35 int8, published | | {MCUNET_PEAK_KB} kB | | | |",
             "",
             "Node names are the exported graph's (`Cast_0` is the uint8 → float cast of the "
             "input, before the in-graph /255 and normalization, which an int8 graph quantizes "
             "only afterwards).",
             ""]
    section = "\n".join(lines)
    print(section)
    if args.write:
        write_section(Path(args.write), "export", section)
    return 0


def pull_over_loopback(result, runs: int = 5) -> dict:
    """Publish `result` into a fresh state dir, serve it, and time DeviceClient.pull()."""
    import tempfile

    from edgecl.client import DeviceClient
    from edgecl.config import Config
    from edgecl.export.snapshots import SnapshotStore, snapshot_meta
    from edgecl.serve.daemon import Daemon

    with tempfile.TemporaryDirectory(prefix="edgecl-pull-") as tmp:
        config = Config()
        config.serve.port, config.serve.bind = 0, "127.0.0.1"
        config.serve.state_dir = f"{tmp}/state"
        # Transport only: published whatever the gate said (publish_export would enforce it).
        SnapshotStore(f"{tmp}/state/snapshots").publish(
            {"model.onnx": result.fp32, "model.int8.onnx": result.int8},
            snapshot_meta(result, samples_learned=0))
        daemon = Daemon(config).start()
        daemon.wait_bound()
        times = {"all": [], "int8": []}
        try:
            for i in range(runs):
                for kind in times:
                    device = DeviceClient(daemon.address, f"{tmp}/dev-{kind}-{i}",
                                          int8_only=kind == "int8")
                    t = time.perf_counter()
                    assert device.pull() == 1
                    times[kind].append(time.perf_counter() - t)
            meta_bytes = len(SnapshotStore(f"{tmp}/state/snapshots").read(1, "meta.json"))
        finally:
            daemon.stop()
            daemon.join(30)
    return {"runs": runs, "chunk_kib": config.snapshots.chunk_bytes // 1024,
            "credit": config.snapshots.credit,
            "all_ms": 1000 * statistics.median(times["all"]),
            "int8_ms": 1000 * statistics.median(times["int8"]),
            "bytes_all": len(result.fp32) + len(result.int8) + meta_bytes,
            "bytes_int8": len(result.int8) + meta_bytes}


def _pct(v):
    return "n/a" if v is None else f"{v:.1%}"


if __name__ == "__main__":
    sys.exit(main())
