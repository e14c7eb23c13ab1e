"""How fast a restarted daemon serves again: `edgecl serve` on a state directory holding
10,000 journaled, unlearned MNIST digits (a daemon killed while far behind).

For each overload policy it measures, from the launch of the process: the first ack of a new
push, the learner loaded (`learner_state`), the first learned sample and the end of the
journal replay. Then it kills the daemon with SIGKILL and starts it again: the replay must not
start over (the daemon checkpoints right after replaying).

    .venv/bin/python benchmarks/fast_start.py [--samples 10000] [--write]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from crash import DaemonProcess, free_port_pair  # noqa: E402  benchmarks/, this folder
from ingest import machine  # noqa: E402
from sections import write_section  # noqa: E402


def journal_mnist(state_dir: Path, samples: int, batch: int = 50) -> None:
    from edgecl.data import split_mnist
    from edgecl.serve.journal import Journal
    from edgecl.serve.queue import Batch

    stream = split_mnist(0)
    x, y = stream.train_x, stream.train_y.tolist()
    journal = Journal(state_dir / "journal", fsync="interval")
    journal.open()
    for first in range(0, samples, batch):
        idx = [(first + i) % len(y) for i in range(batch)]
        journal.append(Batch("old", first, x[idx], [y[i] for i in idx], first=first))
    journal.close()


def first_ack(address: str, started: float, timeout: float = 60.0) -> float:
    """Seconds from `started` to the first ok reply to a new push (tried every 20 ms)."""
    from edgecl.wire import pack, push_header

    x = np.zeros((1, 1, 28, 28), dtype=np.uint8)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    seq = 0
    try:
        while time.perf_counter() - started < timeout:
            seq += 1
            sock.send_multipart([pack(push_header("probe", seq, x, [0])), x.tobytes()])
            if sock.poll(20):
                reply = msgpack.unpackb(sock.recv_multipart()[-1], raw=False)
                if reply.get("ok"):
                    return time.perf_counter() - started
    finally:
        sock.close()
    raise RuntimeError("no ack within the timeout")


def milestones(address: str, started: float, replay: int, timeout: float = 900.0) -> dict:
    """Seconds to the learner loaded, the first learned sample and the end of the replay."""
    from edgecl.client import get_status

    out: dict = {}
    while time.perf_counter() - started < timeout:
        status = get_status(address, timeout=5.0)
        now = time.perf_counter() - started
        consumed = status["samples_learned"] + status.get("samples_offered", 0)
        if status.get("learner_state") == "learning":
            out.setdefault("loaded_s", now)
        if consumed > 0:
            out.setdefault("first_learned_s", now)
        if status["checkpoint"]["replayed_samples"] >= replay:
            out["replayed_s"] = now
            out["trained"], out["offered"] = status["samples_learned"], \
                status.get("samples_offered", 0)
            return out
        time.sleep(0.05)
    raise RuntimeError("the replay did not finish")


def one_policy(policy: str, samples: int) -> dict:
    from edgecl.client import get_status

    state_dir = Path(tempfile.mkdtemp(prefix="edgecl-bench-start-"))
    daemon = DaemonProcess(free_port_pair(), state_dir / "state",
                           [f"serve.overload={policy}"], state_dir / "daemon.log")
    try:
        journal_mnist(daemon.state_dir, samples)
        started = time.perf_counter()
        daemon.start()
        row = {"policy": policy, "first_ack_s": first_ack(daemon.address, started)}
        row.update(milestones(daemon.address, started, samples))
        time.sleep(1.0)
        daemon.kill()   # a crash right after the replay
        started = time.perf_counter()
        daemon.start()
        row["restart_first_ack_s"] = first_ack(daemon.address, started)
        deadline = time.monotonic() + 300
        while get_status(daemon.address)["learner_state"] != "learning":
            if time.monotonic() > deadline:
                raise RuntimeError("the restarted learner did not load")
            time.sleep(0.1)
        row["restart_replayed"] = get_status(daemon.address)["checkpoint"]["replayed_samples"]
        return row
    finally:
        if daemon.proc is not None:   # a failed run leaves no daemon behind either
            daemon.kill()
        shutil.rmtree(state_dir, ignore_errors=True)


def render(rows: list[dict], samples: int) -> str:
    lines = ["## Fast start", "",
             f"`edgecl serve` on a state directory holding {samples:,} journaled, unlearned "
             "MNIST digits. Seconds from the launch of the process. Then SIGKILL right after "
             "the replay and a second start: how much of the journal it replays again.", "",
             "| policy | first ack | learner loaded | first sample learned | replay done | "
             "trained / offered in the replay | after a crash: first ack | replayed again |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['policy']} | {r['first_ack_s']:.2f} | {r['loaded_s']:.1f} | "
                     f"{r['first_learned_s']:.1f} | {r['replayed_s']:.1f} | {r['trained']} / "
                     f"{r['offered']} | {r['restart_first_ack_s']:.2f} | "
                     f"{r['restart_replayed']} |")
    lines += ["", f"Command: `.venv/bin/python benchmarks/fast_start.py --samples {samples} "
              f"--write`. Machine: {machine()}."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--policies", default="backpressure,realtime")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    rows = [one_policy(policy, args.samples) for policy in args.policies.split(",")]
    text = render(rows, args.samples)
    print(text)
    if args.write:
        write_section(Path(__file__).resolve().parent.parent / "BENCHMARKS.md", "fast-start",
                      text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
