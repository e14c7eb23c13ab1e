"""Crash test of `edgecl serve`: SIGKILL at random moments, restart, nothing acked is lost or
learned twice. Also the price of durability: ack throughput with fsync "batch" against
"interval", and checkpoint write time and size for the default learner.

    .venv/bin/python benchmarks/crash.py --rounds 20 --samples 5000     # prints the results
    .venv/bin/python benchmarks/crash.py --quick                        # a smaller run

tests/test_durability.py runs `crash_run` with 6 rounds and 2,000 samples.

A round: a thread kills the daemon (a real `python -m edgecl serve` process) with SIGKILL after a
random delay and starts it again on the same port and state directory, while one sensor pushes
its share of the stream with a short timeout and unlimited retries (the same seq on every
resend). The kill lands wherever the daemon is: importing, restoring, replaying the journal,
acking, learning, writing a checkpoint or a snapshot. After the round the sensor flushes (every
batch acked), the daemon drains, and the round checks:
- samples received = samples learned (held-out ones included) = distinct samples acked;
- if a checkpoint existed when the daemon was killed, the new one restored the newest;
- snapshot versions never go back.
At the end: a snapshot is exported after all restarts and gets a higher version, the daemon
stops cleanly, and its last checkpoint is loaded here: per label, the samples the held-out
slice counted (every sample the learner was offered) equal the samples acked.
"""
from __future__ import annotations

import argparse
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgecl.client import Connection, SensorClient, get_status  # noqa: E402
from ingest import machine  # noqa: E402  (benchmarks/: the same machine line everywhere)

SHAPE = (1, 8, 8)           # small samples keep the learner fast; durability is not about size
CLASSES = 4
# A small, fast learner, frequent checkpoints and snapshots, tiny journal segments: every
# durability path runs many times in a short test. The gate is opened so that an untrained
# model's snapshots publish (the test checks versions, not accuracy).
FAST_SETTINGS = [
    "learner.method=finetune", "learner.buffer_size=20", "learner.threads=1",
    "learner.iterations=1",
    "serve.learn_batch=50",
    "checkpoints.every_steps=3", "journal.segment_mb=0.01",
    "snapshots.heldout_every=10",
    "snapshots.gate_min_int8_agreement=0.0", "snapshots.gate_max_accuracy_drop=1.0",
    "snapshots.gate_max_abs_logit=1.0",
]


def free_port_pair() -> int:
    """A port p with p and p + 1 free (requests and announcements)."""
    for _ in range(100):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no free pair of adjacent ports")


class DaemonProcess:
    """`python -m edgecl serve` on a fixed port and state dir, restartable."""

    def __init__(self, port: int, state_dir: Path, settings: list[str], log_path: Path):
        self.port = port
        self.state_dir = state_dir
        self.settings = settings
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def start(self) -> None:
        args = [sys.executable, "-m", "edgecl", "serve", "--port", str(self.port),
                "--bind", "127.0.0.1", "--state-dir", str(self.state_dir)]
        for setting in self.settings:
            args += ["--set", setting]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=log, cwd=ROOT)
        self.starts += 1

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def checkpoints_in(state_dir: Path) -> list[str]:
    return sorted(p.name for p in (state_dir / "checkpoints").glob("*.ckpt"))


def wait_drained(address: str, timeout: float = 120) -> dict:
    """Status once everything acked is learned (journal replay included)."""
    deadline = time.monotonic() + timeout
    while True:
        status = get_status(address, timeout=1.0, retries=30)
        consumed = status["samples_learned"] + status.get("samples_offered", 0) \
            + status["samples_failed"]
        if status["queue_depth"] == 0 and consumed == status["samples_received"]:
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"daemon did not drain: {status['queue_depth']} queued")
        time.sleep(0.1)


def crash_run(state_dir: Path, rounds: int = 6, samples: int = 2000, seed: int = 0,
              max_delay_s: float = 4.0, snapshot_every: int = 0, say=print) -> dict:
    """The crash test; raises AssertionError on the first broken promise, returns figures.

    A snapshot is exported before the first kill; after each restart the newest is republished
    (a rollback: no export, the next version number). `snapshot_every` adds exports every that
    many learned samples and one after the last kill (kills then land mid-export too; slower)."""
    rng = random.Random(seed)
    data = np.random.default_rng(seed).integers(0, 256, (samples, *SHAPE), dtype=np.uint8)
    labels = [i * CLASSES // samples for i in range(samples)]    # class-incremental order
    batches, start = [], 0
    while start < samples:                                       # pushes of 1..40 samples
        n = rng.randint(1, 40)
        batches.append((start, min(samples, start + n)))
        start += n
    state_dir = Path(state_dir)
    daemon = DaemonProcess(free_port_pair(), state_dir,
                           [*FAST_SETTINGS, f"snapshots.every_samples={snapshot_every}"],
                           state_dir.parent / "daemon.log")
    started = time.monotonic()
    daemon.start()
    try:
        return _crash_rounds(daemon, client_for(daemon), batches, data, labels, rounds, rng,
                             max_delay_s, snapshot_every, state_dir, started, say)
    except BaseException:
        tail = daemon.log_path.read_text(errors="replace").splitlines()[-40:]
        print("daemon log, last lines:", *tail, sep="\n  ", file=sys.stderr)
        raise
    finally:
        daemon.kill()  # a no-op after a clean stop; never leave a daemon behind


def client_for(daemon: DaemonProcess) -> SensorClient:
    """One sensor, short timeout, never giving up: it resends across every restart."""
    return SensorClient(daemon.address, sensor="crash-sensor", timeout=0.5, retries=10**9,
                        first_seq=1)


def _crash_rounds(daemon, client, batches, data, labels, rounds, rng, max_delay_s,
                  snapshot_every, state_dir, started, say) -> dict:
    samples = len(labels)
    kills: list[dict] = []
    shares = np.array_split(np.arange(len(batches)), rounds + 2)

    def push_share(share, over_s: float = 0.0) -> None:
        """Push these batches, spread over `over_s` seconds (so a kill lands mid-stream)."""
        for i in share:
            lo, hi = batches[i]
            client.push(data[lo:hi], labels[lo:hi])
            time.sleep(over_s / len(share))

    def export_while_pushing(share, since: int) -> int:
        """Ask for a snapshot, push (its first learner step exports), wait for the version."""
        with Connection(daemon.address, timeout=70.0, retries=2) as conn:
            conn.request("snapshot.export")
            push_share(share)
            client.flush()
            info = conn.request("snapshot.info", since=since, wait_ms=60_000)
        assert info["version"] is not None and info["version"] > since, \
            f"no snapshot version after {since}: {info['version']}"
        return info["version"]

    versions = [export_while_pushing(shares[0], 0)]

    def kill_and_restart(delay: float) -> None:
        time.sleep(delay)
        daemon.kill()
        kills.append({"delay_s": round(delay, 2), "checkpoints": checkpoints_in(state_dir)})
        daemon.start()

    for round_no in range(rounds):
        killer = threading.Thread(target=kill_and_restart,
                                  args=(rng.uniform(0.0, max_delay_s),))
        killer.start()
        push_share(shares[round_no + 1], over_s=max_delay_s)
        killer.join()
        client.flush()
        status = wait_drained(daemon.address)
        acked = client.stats.acked_samples
        assert status["samples_received"] == acked, \
            f"round {round_no}: daemon accepted {status['samples_received']}, acked {acked}"
        assert status["samples_learned"] == acked and status["samples_failed"] == 0, \
            f"round {round_no}: learned {status['samples_learned']} of {acked} acked"
        before = kills[-1]["checkpoints"]
        restored = status["checkpoint"]["restored_from"]
        assert not before or restored == before[-1], \
            f"round {round_no}: checkpoints {before} at the kill, restored {restored}"
        kept = status.get("snapshot_versions") or []
        assert kept and kept == sorted(kept) and kept[-1] >= versions[-1], \
            f"round {round_no}: snapshot versions went back: {versions} then {kept}"
        # Republishing the newest (a rollback, no export) takes the next version number.
        with Connection(daemon.address, timeout=5.0, retries=2) as conn:
            version = conn.request("snapshot.rollback", to=kept[-1])["version"]
        assert version > max(versions + kept), \
            f"round {round_no}: new snapshot version {version} after {versions}, {kept}"
        versions.append(version)
        say(f"round {round_no + 1}/{rounds}: killed after {kills[-1]['delay_s']} s, "
            f"{acked} acked = {status['samples_learned']} learned, "
            f"{client.stats.duplicates} duplicate acks so far, restored {restored}, "
            f"snapshot versions kept {kept}, republished as {version}")

    if snapshot_every:  # an export after every restart, too
        versions.append(export_while_pushing(shares[-1], versions[-1]))
    else:
        push_share(shares[-1])
        client.flush()
    status = wait_drained(daemon.address)
    assert status["samples_learned"] == samples == client.stats.acked_samples, \
        f"end: learned {status['samples_learned']}, acked {client.stats.acked_samples}"
    client.close()
    assert daemon.stop() == 0, "daemon did not exit 0 on SIGTERM"

    final = check_final_checkpoint(state_dir, Counter(labels))
    return {"rounds": rounds, "samples": samples, "pushes": len(batches),
            "starts": daemon.starts, "kill_delays_s": [k["delay_s"] for k in kills],
            "duplicate_acks": client.stats.duplicates, "resends": client.stats.retried,
            "snapshot_versions": versions, "seconds": round(time.monotonic() - started, 1),
            **final}


def check_final_checkpoint(state_dir: Path, expected: Counter) -> dict:
    """Load the newest checkpoint into a learner; its held-out slice saw every sample once."""
    from edgecl.learn import LearnerConfig, OnlineLearner
    from edgecl.serve.checkpoints import CheckpointStore

    state, path = CheckpointStore(state_dir / "checkpoints").load_newest()
    offered = Counter(dict(state["parts"]["heldout"]["counts"]))
    assert offered == expected, f"per-label samples offered {dict(offered)} != acked " \
                                f"{dict(expected)}"
    held_out = sum(n for _, n in state["parts"]["heldout"]["diverted"])
    learner = OnlineLearner(LearnerConfig(**state["learner"]["config"]))
    learner.load_state_dict(state["learner"])
    assert learner.samples_learned + held_out == sum(expected.values()), \
        f"learner {learner.samples_learned} + held out {held_out} != {sum(expected.values())}"
    return {"checkpoint": path.name, "learner_samples": learner.samples_learned,
            "held_out": held_out}


# ---------------------------------------------------------------------------- the price

def ack_throughput(fsync: str, samples: int, batch: int = 64) -> dict:
    """Acked samples/s from one sensor pushing 1x28x28 uint8 batches as fast as acks come,
    into a daemon whose queue holds them all (so acks are not paced by learning)."""
    with tempfile.TemporaryDirectory(prefix="edgecl-crash-") as tmp:
        daemon = DaemonProcess(free_port_pair(), Path(tmp) / "state",
                               [f"journal.fsync={fsync}", "serve.queue_mb=512",
                                "snapshots.enabled=false", "learner.threads=1"],
                               Path(tmp) / "daemon.log")
        daemon.start()
        x = np.random.default_rng(0).integers(0, 256, (batch, 1, 28, 28), dtype=np.uint8)
        y = [i % 10 for i in range(batch)]
        try:
            get_status(daemon.address, timeout=1.0, retries=60)
            with SensorClient(daemon.address, sensor=f"bench-{fsync}") as client:
                client.push(x, y)
                client.flush()
                t0 = time.perf_counter()
                for _ in range(samples // batch):
                    client.push(x, y)
                client.flush()
                seconds = time.perf_counter() - t0
                latency = sorted(client.stats.ack_latency_s[1:])
        finally:
            daemon.kill()
        return {"fsync": fsync, "samples": samples // batch * batch,
                "acked_per_s": (samples // batch * batch) / seconds,
                "ack_p50_ms": 1000 * latency[len(latency) // 2],
                "ack_p99_ms": 1000 * latency[int(len(latency) * 0.99)]}


def checkpoint_cost(repeats: int = 5) -> dict:
    """Write time and size of a checkpoint of the default learner (derpp+ewcpp, buffer 200)
    after 500 MNIST digits, as the daemon writes it (encode + atomic write)."""
    from edgecl.data import load_source
    from edgecl.learn import OnlineLearner
    from edgecl.serve.checkpoints import CheckpointStore

    x, y = load_source("mnist5k")
    learner = OnlineLearner()
    for start in range(0, 500, 10):
        learner.learn_many(x[start:start + 10], y[start:start + 10])
    times, size = [], 0
    with tempfile.TemporaryDirectory(prefix="edgecl-ckpt-") as tmp:
        store = CheckpointStore(tmp)
        for i in range(repeats):
            t0 = time.perf_counter()
            _, size = store.save({"format": 1, "covered": i + 1,
                                  "learner": learner.state_dict()})
            times.append(time.perf_counter() - t0)
    times.sort()
    return {"bytes": size, "median_s": times[len(times) // 2], "min_s": times[0],
            "max_s": times[-1], "repeats": repeats}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20, help="SIGKILLs (default 20)")
    ap.add_argument("--samples", type=int, default=5000, help="samples pushed (default 5000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--snapshot-every", type=int, default=100, metavar="N",
                    help="also export a snapshot every N learned samples, so kills land "
                         "mid-export too (default 100; 0: only the exports the test makes)")
    ap.add_argument("--throughput-samples", type=int, default=20_000,
                    help="samples pushed per fsync policy (default 20000)")
    ap.add_argument("--quick", action="store_true", help="6 rounds, 2000 samples, 5000 per "
                                                         "fsync policy")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.samples, args.throughput_samples = 6, 2000, 5000
        args.snapshot_every = 0
    print(f"machine: {machine()}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    with tempfile.TemporaryDirectory(prefix="edgecl-crash-") as tmp:
        result = crash_run(Path(tmp) / "state", args.rounds, args.samples, args.seed,
                           snapshot_every=args.snapshot_every)
    print(f"crash test: {result['rounds']} SIGKILLs, {result['samples']} samples in "
          f"{result['pushes']} pushes, {result['starts']} daemon starts, "
          f"{result['duplicate_acks']} duplicate acks, {result['resends']} resends, "
          f"{result['seconds']} s: every acked sample learned exactly once "
          f"({result['learner_samples']} learned + {result['held_out']} held out); "
          f"snapshot versions {result['snapshot_versions']}")
    for fsync in ("batch", "interval"):
        r = ack_throughput(fsync, args.throughput_samples)
        print(f"ack throughput, fsync={fsync}: {r['acked_per_s']:,.0f} samples/s "
              f"({r['samples']} samples in batches of 64), ack p50 {r['ack_p50_ms']:.2f} ms, "
              f"p99 {r['ack_p99_ms']:.2f} ms")
    c = checkpoint_cost()
    print(f"checkpoint (derpp+ewcpp, buffer 200, after 500 digits): {c['bytes']:,} bytes, "
          f"write median {1000 * c['median_s']:.0f} ms (min {1000 * c['min_s']:.0f}, "
          f"max {1000 * c['max_s']:.0f}, {c['repeats']} writes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
