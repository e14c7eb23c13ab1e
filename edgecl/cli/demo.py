"""`edgecl demo` (what `make demo` runs): a daemon on a free port, two simulated sensors
streaming Split-MNIST, status printed while it learns, then a clean stop and a held-out score.

Everything goes over the real wire (SensorClient, status requests); only the final score reads
the learner directly, after the learner thread has finished with it.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from edgecl.errors import UserError

log = logging.getLogger("edgecl.demo")

SENSORS = ("cam-a", "cam-b")


def _stream(address: str, name: str, x: np.ndarray, y: list, batch: int, errors: list) -> None:
    from edgecl.client import SensorClient

    try:
        with SensorClient(address, sensor=name) as client:
            for start in range(0, len(y), batch):
                client.push(x[start:start + batch], y[start:start + batch])
    except Exception as exc:  # reported by the main thread
        errors.append(f"{name}: {exc}")


def _pull_and_score(address: str, out_dir: str, stream) -> None:
    """Act as a device and print what it pulled and how it scores."""
    from edgecl.client import pull_and_score

    scores = pull_and_score(address, out_dir, stream.test_x, stream.test_y)
    if scores is None:
        print("\nno snapshot was published (the parity gate refused it; see status)")
        return
    print(f"\npulled snapshot {scores['version']} into {out_dir}")
    if scores["outcome"] == "rejected":
        print("  (the parity gate refused the newest export; this is the one before it)")
    for name in ("model.onnx", "model.int8.onnx"):
        if scores[name] is None:
            print(f"  {name:16s} not in this version: int8 failed the parity gate, so the "
                  "fp32 model was published alone")
            continue
        print(f"  {name:16s} {scores[name]['bytes'] / 1024:7.0f} KB  onnxruntime accuracy on "
              f"the {len(stream.test_y):,} test digits: {scores[name]['accuracy']:.1%}")


@contextlib.contextmanager
def _state_dir(path: str | None):
    """The demo's state directory: a temporary one, or `path` (kept, for `edgecl report`),
    which must be new or empty: the demo starts from nothing."""
    if path is None:
        with tempfile.TemporaryDirectory(prefix="edgecl-demo-") as tmp:
            yield tmp
        return
    directory = Path(path)
    if directory.exists() and any(directory.iterdir()):
        raise UserError(f"--state-dir {path}: not empty; the demo starts from an empty state "
                        "directory (remove it or choose another)")
    directory.mkdir(parents=True, exist_ok=True)
    yield str(directory)


def _print_status_until_learned(address: str, sensors: list, errors: list, started: float,
                                every_s: float) -> None:
    """Print the daemon's status every `every_s` until the sensors are done and every sample
    they pushed is learned (or a sensor failed)."""
    from edgecl.cli.status import format_status
    from edgecl.client import get_status

    while True:
        time.sleep(every_s)
        status = get_status(address)
        print(f"\n--- {time.monotonic() - started:.0f} s ---\n"
              + format_status(status, address), flush=True)
        pushing = any(t.is_alive() for t in sensors)
        if errors or (not pushing and status["samples_learned"]
                      + status["samples_failed"] >= status["samples_received"]):
            return


def run_demo(args) -> int:
    """Options read from `args` when present: buffer (200), method ("derpp+ewcpp"),
    limit (all 4,000 training digits), batch (32), seed (0), status_every (2.0 s)."""
    from edgecl.config import Config
    from edgecl.data import split_mnist
    from edgecl.serve.daemon import Daemon

    buffer = getattr(args, "buffer", None) or 200
    method = getattr(args, "method", None) or "derpp+ewcpp"
    batch = getattr(args, "batch", None) or 32
    seed = getattr(args, "seed", None) or 0
    status_every = getattr(args, "status_every", None) or 2.0

    stream = split_mnist(seed=seed)
    limit = getattr(args, "limit", None) or len(stream.train_y)
    x, y = stream.train_x[:limit], stream.train_y[:limit].tolist()
    with _state_dir(getattr(args, "state_dir", None)) as state_dir:
        config = Config()
        config.serve.port = 0
        config.serve.bind = "127.0.0.1"
        config.serve.state_dir = state_dir
        config.learner = {"method": method, "buffer_size": buffer, "seed": seed}
        daemon = Daemon(config).start()
        address = daemon.address
        print(f"daemon on {address} (announcements on :{daemon.pub_port}); learner {method}, "
              f"buffer {buffer}", flush=True)
        # Two sensors: each sees every other digit of the same class-incremental stream.
        errors: list[str] = []
        sensors = [threading.Thread(target=_stream, args=(address, name, x[i::2], y[i::2],
                                                          batch, errors), daemon=True)
                   for i, name in enumerate(SENSORS)]
        started = time.monotonic()
        for thread in sensors:
            thread.start()
        print(f"streaming {len(y)} Split-MNIST digits (pairs 0/1 ... 8/9 in order) from "
              f"{', '.join(SENSORS)}", flush=True)
        try:
            _print_status_until_learned(address, sensors, errors, started, status_every)
            if not errors:
                _pull_and_score(address, f"{state_dir}/device", stream)
        finally:
            daemon.stop()
            exit_code = daemon.join(600)
        for thread in sensors:
            thread.join(5)
        if errors:
            print("sensor failed: " + "; ".join(errors))
            return 1
        # The learner thread has exited: reading the learner here races with nothing.
        predicted = np.asarray(daemon.learner.predict_many(stream.test_x))
        correct = predicted == stream.test_y
        per_task = [float(correct[stream.test_task == t].mean())
                    for t in range(len(stream.tasks))]
        print(f"\ndaemon stopped (exit {exit_code}) after {time.monotonic() - started:.0f} s: "
              f"{daemon.samples_received} samples received, {daemon.samples_learned} learned")
        print(f"held-out accuracy on all 10 digits: {correct.mean():.1%} ("
              + ", ".join(f"{a}/{b}: {acc:.0%}" for (a, b), acc in zip(stream.tasks, per_task))
              + ")")
        return 0 if exit_code == 0 else 1


def register(sub) -> None:
    p = sub.add_parser("demo", help="stream Split-MNIST through a local daemon and score it")
    p.add_argument("--method", default="derpp+ewcpp")
    p.add_argument("--buffer", type=int, default=200)
    p.add_argument("--limit", type=int, default=None, help="stream only the first N digits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--state-dir", dest="state_dir", default=None, metavar="DIR",
                   help="keep the daemon's state here (new or empty), e.g. for "
                        "`edgecl report DIR` (default: a temporary directory)")
    p.add_argument("--status-every", dest="status_every", type=float, default=2.0,
                   help="seconds between status lines")
    p.set_defaults(func=run_demo)
