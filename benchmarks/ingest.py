"""Acked ingest throughput of `edgecl serve` while the learner trains, plus ack and status
latency. Writes its section of BENCHMARKS.md.

    .venv/bin/python benchmarks/ingest.py            # full run, updates BENCHMARKS.md
    .venv/bin/python benchmarks/ingest.py --quick    # smaller, prints only

Scenarios, each on a fresh daemon (separate process, default learner):
- burst, 1 and 4 clients: 1x28x28 uint8 batches of 64, as fast as acks come back, into a queue
  bounded by bytes only (64 MiB, `max_lag_s` lifted). The pushed total fits in the queue, so
  this is the rate at which the daemon accepts and acks.
- sustained, 4 clients for 60 s at default settings (backpressure, 2 s of learning queued at
  most): far more than the learner takes, so acks are paced by learning and clients get
  `busy`. Shows the bound holds, the ack wait it costs and each sensor's share of the acks.
During every scenario a separate client asks for `status` every 20 ms.
Clients are separate processes (as real sensors are), so they do not share the daemon's GIL.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from sections import write_section  # benchmarks/, the script's own folder

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BATCH = 64
SHAPE = (1, 28, 28)


def run_daemon(port_queue, serve_overrides: dict, state_dir: str) -> None:
    """Child process: the daemon, exactly as `edgecl serve` runs it (signals included).
    Overrides name a `[serve]` key, or any setting as `section.key`."""
    import logging
    logging.basicConfig(level=logging.WARNING)
    from edgecl.config import Config
    from edgecl.serve.daemon import Daemon

    config = Config()
    config.serve.port = 0
    config.serve.bind = "127.0.0.1"
    config.serve.state_dir = state_dir
    for key, value in serve_overrides.items():
        section, _, name = key.rpartition(".")
        setattr(getattr(config, section or "serve"), name, value)
    daemon = Daemon(config)
    daemon.bind()
    port_queue.put(daemon.port)
    sys.exit(daemon.serve())


def run_sensor(address: str, name: str, samples: int, start_event, results,
               seconds: float = 0.0) -> None:
    """Child process: one sensor pushing `samples` in batches of 64 as fast as it is acked
    (or, with `seconds`, for that long)."""
    from edgecl.client import SensorClient

    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    x = rng.integers(0, 256, (BATCH, *SHAPE), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, BATCH)]
    client = SensorClient(address, sensor=name, timeout=10.0)
    start_event.wait()
    started = time.perf_counter()
    pushes = 0
    while (time.perf_counter() - started < seconds) if seconds else pushes < samples // BATCH:
        client.push(x, labels)
        pushes += 1
    client.flush()
    elapsed = time.perf_counter() - started
    client.close()
    s = client.stats
    results.put({"name": name, "acked": s.acked_samples, "elapsed": elapsed, "busy": s.busy,
                 "retried": s.retried, "started": started, "ended": started + elapsed,
                 "ack_latency": s.ack_latency_s})


def poll_status(address: str, stop: threading.Event, out: dict) -> None:
    from edgecl.client import Connection

    latencies, depths, learned = [], [], []
    with Connection(address, timeout=5.0) as conn:
        while not stop.is_set():
            t0 = time.perf_counter()
            status = conn.request("status")["status"]
            t1 = time.perf_counter()
            latencies.append(t1 - t0)
            depths.append(status["queue_depth"])
            learned.append((t1, status["samples_learned"]))
            stop.wait(0.02)
    out["latency"], out["depth"], out["learned"] = latencies, depths, learned


def percentile_ms(values, q) -> float:
    return float(np.percentile(np.asarray(values) * 1000.0, q)) if values else float("nan")


def scenario(name: str, clients: int, per_client: int, serve_overrides: dict,
             warmup: int, hold_s: float, seconds: float = 0.0) -> dict:
    from edgecl.client import SensorClient, get_status

    ctx = mp.get_context("spawn")
    port_queue = ctx.Queue()
    # a fresh state directory per scenario: a used one restores its journal and checkpoint
    state_dir = tempfile.mkdtemp(prefix=f"edgecl-bench-ingest-{name}-{clients}-")
    daemon = ctx.Process(target=run_daemon, args=(port_queue, serve_overrides, state_dir))
    daemon.start()
    try:
        port = port_queue.get(timeout=120)
        address = f"tcp://127.0.0.1:{port}"
        # Warm-up: the learner builds its model on the first batch; measure while it trains.
        rng = np.random.default_rng(0)
        with SensorClient(address, sensor="warmup") as warm:
            for _ in range(warmup // BATCH):
                warm.push(rng.integers(0, 256, (BATCH, *SHAPE), dtype=np.uint8),
                          [int(v) for v in rng.integers(0, 10, BATCH)])
        deadline = time.monotonic() + 120
        while get_status(address)["samples_learned"] == 0 and time.monotonic() < deadline:
            time.sleep(0.1)

        start_event, results = ctx.Event(), ctx.Queue()
        sensors = [ctx.Process(target=run_sensor,
                               args=(address, f"sensor{i}", per_client, start_event, results,
                                     seconds))
                   for i in range(clients)]
        for p in sensors:
            p.start()
        time.sleep(2.0)  # let every client process import and connect
        stop, polled = threading.Event(), {}
        poller = threading.Thread(target=poll_status, args=(address, stop, polled))
        poller.start()
        start_event.set()
        outcomes = [results.get(timeout=1800) for _ in sensors]
        time.sleep(hold_s)  # status keeps being asked while the learner works on the queue
        stop.set()
        poller.join()
        for p in sensors:
            p.join(30)
        after = get_status(address)
        bound_s = (after["queue_limit_samples"] / after["learn_rate"]
                   if after.get("queue_limit_samples") and after.get("learn_rate") else None)
        assert after["samples_received"] == warmup // BATCH * BATCH + sum(
            o["acked"] for o in outcomes), "acked samples missing from the daemon's count"
    finally:
        if daemon.is_alive():
            daemon.terminate()  # SIGTERM, then a second one: do not wait to learn the queue
            time.sleep(0.5)
            daemon.terminate()
        daemon.join(60)
        if daemon.is_alive():
            daemon.kill()
            daemon.join()
        shutil.rmtree(state_dir, ignore_errors=True)

    wall = max(o["ended"] for o in outcomes) - min(o["started"] for o in outcomes)
    acked = sum(o["acked"] for o in outcomes)
    ack_latency = [v for o in outcomes for v in o["ack_latency"]]
    shares = [o["acked"] for o in outcomes]
    (t_first, n_first), (t_last, n_last) = polled["learned"][0], polled["learned"][-1]
    return {
        "name": name, "clients": clients, "acked": acked, "wall_s": wall,
        "acked_per_s": acked / wall,
        "learned_per_s": (n_last - n_first) / max(1e-9, t_last - t_first),
        "status_window_s": t_last - t_first,
        "busy": sum(o["busy"] for o in outcomes), "retried": sum(o["retried"] for o in outcomes),
        "ack_p50_ms": percentile_ms(ack_latency, 50), "ack_p99_ms": percentile_ms(ack_latency, 99),
        "status_n": len(polled["latency"]),
        "status_p50_ms": percentile_ms(polled["latency"], 50),
        "status_p99_ms": percentile_ms(polled["latency"], 99),
        "max_queue_depth": max(polled["depth"] or [0]),
        "queue_capacity": after["queue_capacity_bytes"] // int(np.prod(SHAPE)),
        "queue_bound_s": bound_s,
        "share_spread": (max(shares) - min(shares)) / max(1e-9, np.mean(shares)),
    }


def machine() -> str:
    cpu = "unknown CPU"
    try:
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)
    except (OSError, AttributeError):
        pass
    import zmq
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, pyzmq {zmq.__version__} / libzmq "
            f"{zmq.zmq_version()}; load average at start {load}")


def table(rows: list[dict]) -> str:
    head = ("| scenario | clients | acked samples | acked/s | learned/s | busy replies "
            "| ack p50 / p99 ms | status p50 / p99 ms (n) | max queue depth / capacity "
            "| queue bound, s of learning | spread of sensors' acks |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['name']} | {r['clients']} | {r['acked']:,} | {r['acked_per_s']:,.0f} | "
        f"{r['learned_per_s']:,.0f} | {r['busy']:,} | {r['ack_p50_ms']:.2f} / "
        f"{r['ack_p99_ms']:.2f} | {r['status_p50_ms']:.2f} / {r['status_p99_ms']:.2f} "
        f"({r['status_n']}) | {r['max_queue_depth']:,} / {r['queue_capacity']:,} | "
        f"{'bytes only' if not r['queue_bound_s'] or r['queue_bound_s'] > 1e6 else format(r['queue_bound_s'], '.1f')} | "
        f"{r['share_spread']:.0%} |\n"
        for r in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small run; do not write the file")
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args()
    scale = 0.25 if args.quick else 1.0
    per = int(40_000 * scale) // BATCH * BATCH
    bytes_only = {"max_lag_s": 1e9}  # the 64 MiB memory bound alone
    plan = [
        ("burst", 1, per, bytes_only, 0.0),
        ("burst", 4, per // 4, bytes_only, 0.0),
        ("sustained, default settings", 4, 0, {}, 60.0 * scale),
    ]
    header = machine()
    print(header, flush=True)
    rows = []
    for name, clients, per_client, overrides, seconds in plan:
        print(f"running {name} with {clients} client(s) ...", flush=True)
        row = scenario(name, clients, per_client, overrides, warmup=640,
                       hold_s=2.0 if args.quick else 8.0, seconds=seconds)
        rows.append(row)
        print(table([row]), flush=True)
    text = table(rows)
    print(text)
    if not args.quick:
        command = "make venv && .venv/bin/python benchmarks/ingest.py"
        section = (
            "## Ingest: `edgecl serve` acked throughput and latency\n\n"
            f"Command: `{command}` (script: `benchmarks/ingest.py`; "
            f"run {time.strftime('%Y-%m-%d %H:%M %Z')}).\n\n"
            f"Machine: {header}. The machine is shared with other work; the load average at "
            "start says how busy it was, and a busy machine lowers every rate here, the "
            "learning rate most of all.\n\n"
            "1x28x28 uint8 samples, batches of 64, default daemon settings (backpressure, "
            "64 MiB queue, credit window 8, every push journaled and fsynced before its ack: "
            "`journal.fsync = batch`) and default learner (derpp+ewcpp, buffer 200) training "
            "throughout. Daemon and each client are separate processes. *burst*: the queue is "
            "bounded by bytes only (`max_lag_s` lifted) and the pushed total fits in it, so "
            "acked/s is the daemon's ingest rate. *sustained*: 4 sensors push for 60 s as fast "
            "as they are acked, at default settings: the queue holds 2 s of learning, so acks "
            "are paced by learning (`busy` replies, whose back-off is inside the ack latency). "
            "*spread*: (most - fewest) / mean of the samples acked per sensor. Another client "
            "requests status every 20 ms from the start of pushing until 8 s after the last "
            "ack; *learned/s* is the learning rate over that window. Ack latency is first "
            "send to ack, per batch.\n\n"
            + text + "\nIn the sustained run refused sensors are admitted in the order they "
            "were refused, so each sensor gets its turn: with 64-sample pushes and a bound of "
            "2 s of learning (less than one push at this rate), the queue takes one push at a "
            "time, and a push waits for the pushes of the other three sensors to be learned.\n")
        write_section(Path(args.out), "ingest", section)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
