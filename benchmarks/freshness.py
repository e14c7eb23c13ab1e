"""Snapshot freshness under load: how old is the model a device can pull?

    .venv/bin/python benchmarks/freshness.py [--seconds 60] [--write BENCHMARKS.md]

A sample's snapshot age is the time from its ack to the first published snapshot that learned
it (status `snapshot_age`, edgecl/export/freshness.py; median and p95 over samples), split into
the time it sat in the queue before the learner reached it and the rest (schedule + export).

Scenarios, each on a fresh daemon in its own process at default settings (the learner and
snapshots as shipped; only the port and state directory are set), fed the bundled MNIST-5k
digits in class-incremental order by one sensor in this process for --seconds:
- idle: 10 samples every 2 s, well below what the learner can learn;
- full ingest: pushes of 64 as fast as they are acked (backpressure: the queue holds
  serve.max_lag_s = 2 s of learning, then `busy`);
- full ingest, realtime: the same with serve.overload = "realtime" (every push acked, what the
  learner has no time for offered to the buffer);
- full ingest, bytes-only queue: backpressure bounded by the 64 MiB queue alone (max_lag_s
  lifted), as before the lag bound existed;
- full ingest, snapshots off: the learning rate without exports, to see what exporting costs.
After the pushing stops, the daemon gets --drain seconds to learn and publish, then is stopped
(the queue is abandoned). Export time comes from the published versions' meta.json.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ingest import machine as ingest_machine  # noqa: E402  benchmarks/, this folder
from ingest import run_daemon  # noqa: E402
from sections import write_section  # noqa: E402

BATCH = 64


def push_for(address: str, seconds: float, full: bool) -> int:
    """Push MNIST-5k (looping) for `seconds`: as fast as acked, or 10 samples every 2 s."""
    from edgecl.client import SensorClient
    from edgecl.data import load_mnist5k

    x, y = load_mnist5k()
    order = sorted(range(len(y)), key=lambda i: int(y[i]))  # class-incremental
    x, y = x[order], [int(y[i]) for i in order]
    size = BATCH if full else 10
    pushed, i = 0, 0
    end = time.monotonic() + seconds
    with SensorClient(address, sensor="bench", timeout=10.0) as client:
        while time.monotonic() < end:
            j = i % len(y)
            client.push(x[j:j + size], y[j:j + size])
            pushed += len(y[j:j + size])
            i = j + size
            if not full:
                time.sleep(2.0)
        client.flush()
    return pushed


def scenario(name: str, overrides: dict, seconds: float, drain: float, full: bool) -> dict:
    from edgecl.client import get_status

    ctx = mp.get_context("spawn")
    port_queue = ctx.Queue()
    state_dir = tempfile.mkdtemp(prefix="edgecl-bench-freshness-")
    daemon = ctx.Process(target=run_daemon, args=(port_queue, overrides, state_dir))
    daemon.start()
    try:
        address = f"tcp://127.0.0.1:{port_queue.get(timeout=120)}"
        t0, before = time.monotonic(), get_status(address)
        pushed = push_for(address, seconds, full)
        mid = get_status(address)
        t1 = time.monotonic()
        deadline = t1 + drain
        while time.monotonic() < deadline:
            status = get_status(address)
            if status["queue_depth"] == 0 and time.monotonic() > t1 + 10:
                break  # learned everything; 10 s more let a last timed export cover it
            time.sleep(1.0)
        end = get_status(address)
        exports = export_seconds(Path(state_dir) / "snapshots")
    finally:
        if daemon.is_alive():
            daemon.terminate()
            time.sleep(0.5)
            daemon.terminate()  # the second signal: stop now, leave the queue
        daemon.join(120)
        if daemon.is_alive():
            daemon.kill()
            daemon.join()
        shutil.rmtree(state_dir, ignore_errors=True)
    learned_in_push = mid["samples_learned"] - before["samples_learned"]
    return {"name": name, "pushed": pushed, "received": end["samples_received"],
            "learned": end["samples_learned"], "learned_per_s": learned_in_push / (t1 - t0),
            "queue_at_stop": mid["queue_depth"], "versions": end.get("snapshot_version"),
            "age": end.get("snapshot_age"), "exports": exports,
            "rejected": end.get("snapshot_last_failure")}


def export_seconds(root: Path) -> list[float]:
    """Export + quantize + parity time of the kept versions (meta.json)."""
    out = []
    for meta in sorted(root.glob("*/meta.json")):
        out.append(json.loads(meta.read_text())["export_seconds"]["total"])
    return out


def machine() -> str:
    learner = max(1, (os.cpu_count() or 2) - 1)
    return f"{ingest_machine()}; learner threads: default (all cores but one = {learner})"


def render(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| scenario | pushed | learned/s while pushing | queued at stop | versions published "
             "| snapshot age median / p95 s | of which queued median / p95 s | samples covered "
             "| export s, median (max) of kept versions |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        age = r["age"] or {}
        ex = r["exports"]
        ages = (f"{age['median_s']:.1f} / {age['p95_s']:.1f} | {age['queue_median_s']:.1f} / "
                f"{age['queue_p95_s']:.1f} | {age['samples']:,}" if age else "n/a | n/a | 0")
        export = f"{statistics.median(ex):.1f} ({max(ex):.1f})" if ex else "n/a"
        lines.append(f"| {r['name']} | {r['pushed']:,} | {r['learned_per_s']:.1f} "
                     f"| {r['queue_at_stop']:,} | {r['versions'] or 0} | {ages} | {export} |")
    return "\n".join(lines)


SCENARIOS = {"idle": ("idle", {}, False), "full": ("full ingest", {}, True),
             "realtime": ("full ingest, realtime", {"serve.overload": "realtime"}, True),
             "bytes-only": ("full ingest, bytes-only queue", {"serve.max_lag_s": 1e9}, True),
             "no-snapshots": ("full ingest, snapshots off", {"snapshots.enabled": False}, True)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="pushing time per scenario")
    ap.add_argument("--drain", type=float, default=60.0, help="most time to learn afterwards")
    ap.add_argument("--only", help=f"comma-separated, of {', '.join(SCENARIOS)}")
    ap.add_argument("--write", metavar="BENCHMARKS.md", help="replace the freshness section")
    args = ap.parse_args()
    where = machine()
    rows = []
    for key, (name, overrides, full) in SCENARIOS.items():
        if args.only and key not in args.only.split(","):
            continue
        print(f"scenario {name} ...", file=sys.stderr, flush=True)
        rows.append(scenario(name, overrides, args.seconds, args.drain, full))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    header = ("## Snapshot freshness: ack to first published snapshot\n\n"
              f"Command: `.venv/bin/python benchmarks/freshness.py --seconds {args.seconds:g} "
              f"--drain {args.drain:g}{f' --only {args.only}' if args.only else ''}"
              f"{' --write BENCHMARKS.md' if args.write else ''}`  \n"
              f"Machine: {where}.  \nLearner: the one in this branch (defaults).")
    text = render(rows, header)
    print(text)
    if args.write:
        write_section(Path(args.write), "freshness", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
