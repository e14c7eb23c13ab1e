"""Load: N sensors push M samples each at once, through a link that drops every Kth reply, into
a daemon in its own process. Prints acks, retries, busy answers, what was learned, and the
daemon's resident memory (RSS) before, at peak and after.

    .venv/bin/python benchmarks/load.py                          # 8 x 5,000, recording learner
    .venv/bin/python benchmarks/load.py --learner real --samples 1000

--learner recording (default): the daemon's plumbing at full scale. The learner learns nothing
  and counts every sample id, so "learned exactly once" is checked per sample (ids are in the
  first pixels, see tests/load_sensors.py); --step-ms sets how long its step takes.
--learner real: the OnlineLearner (finetune, tiny 1x8x8 inputs, 250 samples per step), as the
  daemon runs it; it is the bottleneck, so this measures how the queue holds under it.
tests/test_load.py runs the same scenario smaller and asserts on it.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SHAPE = (1, 8, 8)


def daemon_process(port_queue, result_queue, state_dir: str, learner_kind: str,
                   step_ms: float, queue_mb: float) -> None:
    """Child: the daemon, signals included, as `edgecl serve` runs it."""
    import logging
    logging.basicConfig(level=logging.WARNING)
    from edgecl.serve.daemon import Daemon
    from load_sensors import RecordingLearner
    from test_load import load_config

    config = load_config(Path(state_dir))
    config.serve.queue_mb = queue_mb
    learner = RecordingLearner(step_ms / 1000) if learner_kind == "recording" else None
    daemon = Daemon(config, learner=learner)
    daemon.bind()
    port_queue.put(daemon.port)
    code = daemon.serve()
    if learner is not None:
        counts = list(learner.seen.values())
        result_queue.put({"distinct_ids": len(counts), "max_times_one_id": max(counts or [0])})
    else:
        result_queue.put({})
    sys.exit(code)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sensors", type=int, default=8)
    parser.add_argument("--samples", type=int, default=5000, help="per sensor")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--drop-every", type=int, default=37, help="drop every Kth reply")
    parser.add_argument("--learner", choices=("recording", "real"), default="recording")
    parser.add_argument("--step-ms", type=float, default=20.0,
                        help="recording learner: time per 250-sample step")
    parser.add_argument("--queue-mb", type=float, default=0.125)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()

    import psutil

    from edgecl.client import get_status
    from load_sensors import LossyProxy, RssSampler, push_concurrently, wait_until

    ctx = mp.get_context("spawn")
    ports, results = ctx.Queue(), ctx.Queue()
    with tempfile.TemporaryDirectory() as state:
        child = ctx.Process(target=daemon_process, args=(ports, results, state, args.learner,
                                                         args.step_ms, args.queue_mb))
        child.start()
        address = f"tcp://127.0.0.1:{ports.get(timeout=120)}"
        total = args.sensors * args.samples
        warm = 0
        if args.learner == "real":  # the first step builds the model: keep it out of the figures
            warm = 250
            push_concurrently(address, 1, warm, warm, SHAPE)
            wait_until(lambda: get_status(address)["samples_learned"] >= warm, 300, "warm-up")
        rss = RssSampler(child.pid)
        proxy = LossyProxy(address, args.drop_every)
        started = time.monotonic()
        try:
            sensors = push_concurrently(proxy.address, args.sensors, args.samples, args.batch,
                                        SHAPE, timeout=0.5, retries=20)
        finally:
            proxy.close()
        pushed_s = time.monotonic() - started
        wait_until(lambda: get_status(address)["samples_learned"] >= warm + total, 3600,
                   "learning")
        learned_s = time.monotonic() - started
        peak = rss.stop()
        status = get_status(address)
        end_rss = psutil.Process(child.pid).memory_info().rss
        child.terminate()  # SIGTERM: drains (nothing left) and exits 0
        child.join(60)
        ids = results.get(timeout=10)

    out = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
                   f"{platform.python_version()}, {platform.system()}",
        "learner": args.learner, "sensors": args.sensors, "samples_per_sensor": args.samples,
        "batch": args.batch, "drop_every": args.drop_every, "queue_mb": args.queue_mb,
        "acked": sum(s.stats.acked_samples for s in sensors),
        "sensor_errors": [s.error for s in sensors if s.error],
        "retried_pushes": sum(s.stats.retried for s in sensors),
        "duplicate_acks": sum(s.stats.duplicates for s in sensors),
        "busy_answers": status["refused"]["busy"],
        "replies_dropped": proxy.dropped,
        "samples_received": status["samples_received"] - warm,
        "samples_learned": status["samples_learned"] - warm,
        "samples_duplicate": status["samples_duplicate"],
        **ids,
        "push_s": round(pushed_s, 2), "acked_per_s": round(total / pushed_s),
        "all_learned_s": round(learned_s, 2),
        "daemon_rss_mib": {"start": round(rss.start_rss / 2**20, 1),
                           "peak": round(peak / 2**20, 1), "end": round(end_rss / 2**20, 1)},
        "exit_code": child.exitcode,
    }
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    exact = (out["acked"] == out["samples_received"] == out["samples_learned"] == total
             and not out["sensor_errors"]
             and (args.learner == "real" or (out["distinct_ids"] == total
                                             and out["max_times_one_id"] == 1)))
    print("every sample acked and learned exactly once" if exact else "MISMATCH")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
