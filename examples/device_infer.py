"""A low-memory device: classify with the daemon's newest int8 model, swap versions live.

    python examples/device_infer.py --from tcp://127.0.0.1:5555 --dir device-model

- Pulls the newest snapshot (int8 only) into --dir, then follows announcements in a
  background thread (DeviceClient.watch), which verifies sha256 before installing.
- Each new version is loaded into a fresh onnxruntime session *before* it replaces the old
  one; a request reads the current (session, meta) pair once, so a swap never drops or
  mixes up a request.
- Feeds the graph exactly what meta.json's input spec says (uint8 N,C,H,W: raw sensor bytes;
  scaling and normalization are inside the model). Here the "sensor" is the bundled MNIST-5k
  digits when the spec is 1x28x28 and the `data` extra is installed, random bytes otherwise.
- Runs in the lean install (`pip install edgecl`: onnxruntime, no torch).
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgecl.client import DeviceClient
from edgecl.files import INT8_FILE, META_FILE
from edgecl.extras import missing_extras


class LiveModel:
    """The installed model; `reload()` swaps in a new one atomically."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.current = self._load()

    def _load(self):
        meta = json.loads((self.directory / META_FILE).read_text())
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        session = ort.InferenceSession(str(self.directory / INT8_FILE), opts,
                                       providers=["CPUExecutionProvider"])
        return session, meta

    def reload(self, version: int) -> None:
        self.current = self._load()  # built first, then one reference assignment
        print(f"swapped to snapshot {version}", flush=True)

    def classify(self, x: np.ndarray) -> tuple[list, int]:
        session, meta = self.current  # one read: this request uses one model throughout
        logits = session.run(None, {meta["input"]["name"]: x})[0]
        return [meta["labels"][i] for i in logits.argmax(1)], meta["version"]


def sensor_frames(meta: dict, seed: int = 0):
    """Endless (image, label-or-None) batches of one, shaped as the model's input spec."""
    _, c, h, w = meta["input"]["shape"]
    dtype = np.uint8 if meta["input"]["dtype"] == "uint8" else np.float32
    if (c, h, w) == (1, 28, 28) and dtype == np.uint8 and not missing_extras("data"):
        from edgecl.data import load_mnist5k
        x, y = load_mnist5k()
    else:
        rng = np.random.default_rng(seed)
        x = rng.integers(0, 256, (256, c, h, w)).astype(dtype)
        x = x / 255 if dtype == np.float32 else x
        y = [None] * len(x)
    i = 0
    while True:
        yield x[i:i + 1], y[i]
        i = (i + 1) % len(x)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from", dest="address", default="tcp://127.0.0.1:5555")
    ap.add_argument("--dir", default="device-model", help="where the model is installed")
    ap.add_argument("--seconds", type=float, default=0, help="stop after this long (0: never)")
    ap.add_argument("--wait-ms", type=int, default=60_000,
                    help="how long to wait for a first snapshot")
    args = ap.parse_args()
    directory = Path(args.dir)
    device = DeviceClient(args.address, directory, int8_only=True)
    if device.local_version() is None and device.pull(wait_ms=args.wait_ms) is None:
        print(f"no snapshot from {args.address} within {args.wait_ms} ms", file=sys.stderr)
        return 1
    model = LiveModel(directory)
    stop = threading.Event()
    watcher = threading.Thread(target=device.watch, kwargs={"on_update": model.reload,
                                                            "stop": stop}, daemon=True)
    watcher.start()

    started = last = time.monotonic()
    served = correct = labelled = 0
    try:
        for x, label in sensor_frames(model.current[1]):
            predicted, version = model.classify(x)
            served += 1
            if label is not None:
                labelled += 1
                correct += int(predicted[0] == label or str(predicted[0]) == str(label))
            now = time.monotonic()
            if now - last >= 1.0:
                acc = f", accuracy {correct / labelled:.1%}" if labelled else ""
                print(f"version {version}: {served} images, {served / (now - started):.0f}/s"
                      f"{acc}", flush=True)
                last = now
            if args.seconds and now - started >= args.seconds:
                break
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        watcher.join(2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
