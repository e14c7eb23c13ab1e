"""`edgecl bench realtime`: Split-MNIST streamed at a fixed rate through a real daemon.

For each overload policy and each rate R (a multiple of the learner's own rate L, measured
first), a fresh `edgecl serve` child process is fed by sensors that push on a fixed clock and
never wait: a `busy` reply drops that push, as a camera drops a frame. Reported per run: the
accuracy on the 1,000 test digits of the learner and of the snapshot a device pulls, samples
trained on and only offered to the buffer, ack latency, busy replies and queue depth over time.
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import shutil
import tempfile
import threading
import time
from pathlib import Path

import msgpack
import numpy as np

from edgecl.errors import UserError

POLICIES = ("backpressure", "realtime")
FACTORS = (0.5, 1.0, 3.0, 10.0, 100.0)
PUSHES_PER_S = 20          # per sensor: the batch grows with R, up to MAX_PUSH samples
MAX_PUSH = 64
ACK_WAIT_S = 30.0          # after its last push, how long a sensor waits for missing acks


def _daemon_child(conn, settings: dict, state_dir: str, test_x) -> None:
    """Child process: a daemon as `edgecl serve` builds it; on request, stop and send back
    the learner's predictions on the test samples (the learner thread has finished)."""
    logging.basicConfig(level=logging.WARNING)
    from edgecl.config import Config, apply
    from edgecl.serve.daemon import Daemon

    config = Config()
    config.serve.port, config.serve.bind, config.serve.state_dir = 0, "127.0.0.1", state_dir
    for key, value in settings.items():   # checked like `edgecl serve --set SECTION.KEY=V`
        section, _, name = key.rpartition(".")
        apply(config, section or "serve", name, value, f"--set {key}")
    daemon = Daemon(config).start()
    conn.send(daemon.port)
    conn.recv()
    daemon.stop()
    daemon.stop()  # whatever is still queued was acked after the stream's end: not scored
    daemon.join(600)
    conn.send([int(v) for v in daemon.learner.predict_many(test_x)])


class DaemonProcess:
    """A daemon child process with a fresh state directory; `finish()` stops it."""

    def __init__(self, settings: dict, test_x: np.ndarray):
        ctx = mp.get_context("spawn")
        self.state_dir = tempfile.mkdtemp(prefix="edgecl-bench-realtime-")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_daemon_child,
                                    args=(child, settings, self.state_dir, test_x))
        self._process.start()
        if not self._conn.poll(180):
            self.close()
            raise RuntimeError("the daemon did not start within 180 s")
        self.address = f"tcp://127.0.0.1:{self._conn.recv()}"

    def finish(self) -> list:
        """Stop the daemon; the learner's predictions on the test samples."""
        self._conn.send("finish")
        if not self._conn.poll(600):
            raise RuntimeError("the daemon did not stop within 600 s")
        return self._conn.recv()

    def close(self) -> None:
        if self._process.is_alive():
            self._process.kill()
        self._process.join(30)
        shutil.rmtree(self.state_dir, ignore_errors=True)


def _sensor(address: str, name: str, plan: list, t0: float, out: dict) -> None:
    """Push `plan` [(offset_s, x, labels)] on the clock from t0, never waiting for an ack;
    record each ack's latency, and count busy replies (the push is dropped) and errors."""
    import zmq

    from edgecl.wire import pack, push_header

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    sent: dict[int, float] = {}
    stats = {"latency": [], "acked": 0, "busy": 0, "dropped": 0, "errors": 0}

    def receive(until: float) -> None:
        while True:
            left = until - time.perf_counter()
            if left <= 0 or not sent or not sock.poll(int(left * 1000) + 1):
                if left > 0 and not sent:
                    time.sleep(left)
                return
            reply = msgpack.unpackb(sock.recv_multipart()[-1], raw=False)
            sent_at = sent.pop(reply.get("seq"), None)
            if sent_at is None:
                continue
            if reply.get("ok"):
                stats["latency"].append(time.perf_counter() - sent_at)
                stats["acked"] += reply["n"]
            elif reply.get("error") == "busy":
                stats["busy"] += 1
                stats["dropped"] += reply_size.get(reply.get("seq"), 0)
            else:
                stats["errors"] += 1

    reply_size: dict[int, int] = {}
    for seq, (offset, x, labels) in enumerate(plan, start=1):
        receive(t0 + offset)
        sock.send_multipart([pack(push_header(name, seq, x, labels)), x.tobytes()])
        sent[seq], reply_size[seq] = time.perf_counter(), len(labels)
    receive(time.perf_counter() + ACK_WAIT_S)
    stats["unanswered"] = len(sent)
    sock.close()
    out[name] = stats


def _plans(x: np.ndarray, y: list, rate: float, sensors: int) -> list[list]:
    """The stream cut into pushes on one clock at `rate` samples/s, dealt round-robin to the
    sensors (each sees every sensors-th push of the same class-incremental stream)."""
    size = int(np.clip(round(rate / sensors / PUSHES_PER_S), 1, MAX_PUSH))
    plans: list[list] = [[] for _ in range(sensors)]
    for i, start in enumerate(range(0, len(y), size)):
        plans[i % sensors].append((start / rate, x[start:start + size], y[start:start + size]))
    return plans


def _watch(address: str, stop: threading.Event, t0: float, out: list) -> None:
    """Status every 0.25 s: (seconds since t0, queue depth, trained, offered)."""
    from edgecl.client import Connection

    with Connection(address, timeout=10.0) as conn:
        while not stop.is_set():
            status = conn.request("status")["status"]
            out.append((round(time.perf_counter() - t0, 2), status["queue_depth"],
                        status["samples_learned"], status.get("samples_offered", 0)))
            stop.wait(0.25)


def stream_once(policy: str, rate: float, x: np.ndarray, y: list, test, sensors: int,
                settings: dict) -> dict:
    """One run: stream `x, y` at `rate` through a fresh daemon under `policy`, then score."""
    from edgecl.client import get_status
    from edgecl.client import pull_and_score

    daemon = DaemonProcess({**settings, "serve.overload": policy}, test.test_x)
    try:
        plans = _plans(x, y, rate, sensors)
        t0 = time.perf_counter() + 1.0
        results: dict = {}
        threads = [threading.Thread(target=_sensor, args=(daemon.address, f"sensor{i}", plan,
                                                          t0, results))
                   for i, plan in enumerate(plans)]
        depth: list = []
        stop = threading.Event()
        watcher = threading.Thread(target=_watch, args=(daemon.address, stop, t0, depth))
        for thread in (*threads, watcher):
            thread.start()
        for thread in threads:
            thread.join()
        stream_s = time.perf_counter() - t0
        _wait_drained(daemon.address)
        stop.set()
        watcher.join()
        status = get_status(daemon.address)
        scores = pull_and_score(daemon.address, f"{daemon.state_dir}/device", test.test_x,
                                test.test_y)
        learner_acc = float(np.mean(np.asarray(daemon.finish()) == test.test_y))
    finally:
        daemon.close()
    return _row(policy, rate, results, status, scores, learner_acc, depth, stream_s)


def _wait_drained(address: str, timeout_s: float = 900.0) -> None:
    from edgecl.client import get_status

    deadline = time.monotonic() + timeout_s
    while get_status(address)["queue_depth"] > 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the daemon did not drain its queue within {timeout_s:.0f} s")
        time.sleep(0.25)


def _row(policy, rate, results, status, scores, learner_acc, depth, stream_s) -> dict:
    latency = [v for r in results.values() for v in r["latency"]]
    pct = (lambda q: round(float(np.percentile(latency, q)) * 1000, 1)) if latency else \
        (lambda q: None)
    snapshot = None if scores is None else scores["model.onnx"]["accuracy"]
    int8 = None if scores is None else scores["model.int8.onnx"]  # None: fp32 published alone
    return {"policy": policy, "rate": round(rate, 1), "stream_s": round(stream_s, 1),
            "learner_acc": learner_acc, "snapshot_acc": snapshot,
            "snapshot_int8_acc": None if int8 is None else int8["accuracy"],
            "acked": sum(r["acked"] for r in results.values()),
            "dropped": sum(r["dropped"] for r in results.values()),
            "busy": sum(r["busy"] for r in results.values()),
            "errors": sum(r["errors"] + r["unanswered"] for r in results.values()),
            "trained": status["samples_learned"], "offered": status.get("samples_offered", 0),
            "ack_p50_ms": pct(50), "ack_p99_ms": pct(99),
            "max_queue_depth": max((d[1] for d in depth), default=0),
            "snapshot_age": status.get("snapshot_age"), "depth": depth}


def measure_learn_rate(x: np.ndarray, y: list, test, settings: dict) -> float:
    """L: samples per second this daemon trains, from its own moving average after it has
    learned the first 600 samples pushed as fast as it takes them."""
    from edgecl.client import SensorClient, get_status

    daemon = DaemonProcess({**settings, "serve.overload": "backpressure"}, test.test_x[:1])
    try:
        with SensorClient(daemon.address, sensor="calibrate") as client:
            for start in range(0, 600, 20):
                client.push(x[start:start + 20], y[start:start + 20])
        _wait_drained(daemon.address)
        rate = get_status(daemon.address)["learn_rate"]
        daemon.finish()
    finally:
        daemon.close()
    if not rate:
        raise RuntimeError("the daemon reported no learning rate")
    return float(rate)


def run(factors, policies, sensors: int, seed: int, learn_rate: float | None,
        settings: dict, tenth: bool = True, progress=print, save=None) -> dict:
    """Every (policy, factor) run, plus (with `tenth`) backpressure on every 10th sample
    at 0.8 L: the accuracy a learner that keeps up reaches on a tenth of the stream.
    `save(result)` is called after every run, so a long sweep cut short keeps its rows."""
    from edgecl.data import split_mnist

    stream = split_mnist(seed=seed)
    x, y = stream.train_x, stream.train_y.tolist()
    if learn_rate is None:
        progress("measuring the learner's rate L ...")
        learn_rate = measure_learn_rate(x, y, stream, settings)
    progress(f"L = {learn_rate:.1f} samples/s")
    rows: list[dict] = []
    result = {"learn_rate": learn_rate, "sensors": sensors, "seed": seed, "rows": rows}
    save = save or (lambda result: None)
    for policy in policies:
        for factor in factors:
            progress(f"{policy} at {factor:g} L ...")
            row = stream_once(policy, factor * learn_rate, x, y, stream, sensors, settings)
            rows.append({**row, "factor": factor, "stream": "all"})
            progress("  " + _summary(rows[-1]))
            save(result)
    if tenth:
        progress("backpressure on every 10th sample at 0.8 L ...")
        row = stream_once("backpressure", 0.8 * learn_rate, x[::10], y[::10], stream,
                          sensors, settings)
        rows.append({**row, "factor": 0.8, "stream": "tenth"})
        progress("  " + _summary(rows[-1]))
        save(result)
    return result


def _summary(row: dict) -> str:
    snap = "-" if row["snapshot_acc"] is None else f"{row['snapshot_acc']:.1%}"
    return (f"learner {row['learner_acc']:.1%}, snapshot {snap}, trained {row['trained']}, "
            f"offered {row['offered']}, busy {row['busy']}, ack p99 {row['ack_p99_ms']} ms")


def format_table(result: dict) -> str:
    lines = ["| policy | stream | R (× L) | R samples/s | learner acc | snapshot acc (fp32 / "
             "int8) | trained | offered only | dropped by sensors | busy replies | ack p50 / "
             "p99 ms | max queue |", "|" + "---|" * 12]
    for r in result["rows"]:
        int8 = r.get("snapshot_int8_acc")
        snap = "rejected" if r["snapshot_acc"] is None else \
            f"{r['snapshot_acc']:.1%} / " + ("fp32 alone" if int8 is None else f"{int8:.1%}")
        lines.append(f"| {r['policy']} | {r['stream']} | {r['factor']:g} | {r['rate']:g} | "
                     f"{r['learner_acc']:.1%} | {snap} | {r['trained']} | {r['offered']} | "
                     f"{r['dropped']} | {r['busy']} | {r['ack_p50_ms']} / {r['ack_p99_ms']} | "
                     f"{r['max_queue_depth']} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Accuracy against R, one line per policy (log x)."""
    from edgecl.extras import require_extras
    require_extras("edgecl bench realtime --plot", "plot")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for policy in POLICIES:
        rows = [r for r in result["rows"] if r["policy"] == policy and r["stream"] == "all"]
        if rows:
            ax.plot([r["factor"] for r in rows], [100 * r["learner_acc"] for r in rows],
                    marker="o", label=policy)
    tenth = [r for r in result["rows"] if r["stream"] == "tenth"]
    if tenth:
        ax.axhline(100 * tenth[0]["learner_acc"], color="grey", linestyle=":",
                   label="backpressure, 1/10 of the stream")
    ax.set_xscale("log")
    ax.set_xlabel(f"stream rate R, multiples of L = {result['learn_rate']:.0f} samples/s")
    ax.set_ylabel("test accuracy, all 10 digits (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_realtime(args) -> int:
    factors = [float(v) for v in args.factors.split(",") if v]
    policies = [p for p in args.policies.split(",") if p]
    for policy in policies:
        if policy not in POLICIES:
            raise UserError(f"--policies: {policy!r} is not one of {', '.join(POLICIES)}")
    if not factors or min(factors) <= 0 or args.sensors < 1:
        raise UserError("--factors must be positive numbers and --sensors at least 1")
    settings = json.loads(args.set) if args.set else {}
    def save(result: dict) -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
    result = run(factors, policies, args.sensors, args.seed, args.learn_rate, settings,
                 tenth=not args.no_tenth, save=save)
    print(format_table(result))
    if args.plot:
        plot(result, Path(args.plot))
    return 0


def register(bench_sub) -> None:
    p = bench_sub.add_parser("realtime", help="Split-MNIST at fixed rates through a real daemon",
                             description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--factors", default=",".join(f"{f:g}" for f in FACTORS),
                   help="stream rates as multiples of the measured learning rate L")
    p.add_argument("--policies", default=",".join(POLICIES), help="serve.overload values")
    p.add_argument("--sensors", type=int, default=2, help="sensors sharing the stream")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--learn-rate", type=float, default=None, metavar="L",
                   help="skip the measurement of L (samples/s)")
    p.add_argument("--set", default="", metavar="JSON",
                   help='settings as JSON, e.g. \'{"learner.offer_logits": "none"}\'')
    p.add_argument("--no-tenth", action="store_true",
                   help="skip the backpressure run on every 10th sample")
    p.add_argument("--json", metavar="PATH", help="also write every result as JSON")
    p.add_argument("--plot", metavar="PNG", help="accuracy against R, one line per policy")
    p.set_defaults(func=cmd_realtime)
