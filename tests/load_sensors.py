"""Many sensors at once, through a link that loses replies: for tests/test_load.py and
benchmarks/load.py.

- `LossyProxy` sits between sensors and the daemon and drops every Nth reply, so sensors time
  out and resend (Lazy Pirate) and the daemon's dedup has real retries to recognise.
- `push_concurrently` runs one SensorClient per sensor, each in its own thread, and returns
  what every one of them saw. Every sample carries its (sensor, number) in its first pixels.
- `RecordingLearner` reads those ids back, so "learned exactly once" is checked per sample.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import zmq

from edgecl.client import PushStats, SensorClient


class LossyProxy:
    """Sensors connect to `address`; each sensor connection gets its own DEALER to the daemon
    (the daemon answers one hop: [identity, header, payload]), and every `drop_every`th reply
    is thrown away. Runs in a thread until `close()`."""

    def __init__(self, daemon_address: str, drop_every: int):
        self.daemon_address = daemon_address
        self.drop_every = drop_every
        self.dropped = 0
        self._ctx = zmq.Context.instance()
        self._front = self._ctx.socket(zmq.ROUTER)
        self._front.setsockopt(zmq.LINGER, 0)
        port = self._front.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self._backs: dict[bytes, zmq.Socket] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lossy-proxy", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._front, zmq.POLLIN)
        owner: dict[zmq.Socket, bytes] = {}
        replies = 0
        while not self._stop.is_set():
            for sock, _ in poller.poll(50):
                if sock is self._front:
                    identity, *frames = self._front.recv_multipart(copy=False)
                    key = identity.bytes
                    back = self._backs.get(key)
                    if back is None:
                        back = self._backs[key] = self._ctx.socket(zmq.DEALER)
                        back.setsockopt(zmq.LINGER, 0)
                        back.connect(self.daemon_address)
                        owner[back] = key
                        poller.register(back, zmq.POLLIN)
                    back.send_multipart(frames, copy=False)
                    continue
                frames = sock.recv_multipart(copy=False)
                replies += 1
                if self.drop_every and replies % self.drop_every == 0:
                    self.dropped += 1
                    continue
                self._front.send_multipart([owner[sock], *frames], copy=False)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._front.close(linger=0)
        for back in self._backs.values():
            back.close(linger=0)


@dataclass
class SensorResult:
    sensor: str
    stats: PushStats
    error: str | None


def sensor_data(index: int, samples: int, shape: tuple, classes: int):
    """Random pixels, except that the first three carry (sensor, sample number): the id a
    RecordingLearner reads back."""
    rng = np.random.default_rng(index)
    x = rng.integers(0, 256, (samples, *shape), dtype=np.uint8)
    flat = x.reshape(samples, -1)
    numbers = np.arange(samples)
    flat[:, 0], flat[:, 1], flat[:, 2] = index, numbers >> 8, numbers & 0xff
    y = [int(v) for v in rng.integers(0, classes, samples)]
    return x, y


def sample_ids(x: np.ndarray) -> np.ndarray:
    flat = x.reshape(len(x), -1).astype(np.int64)
    return flat[:, 0] << 16 | flat[:, 1] << 8 | flat[:, 2]


class RecordingLearner:
    """Stands in for OnlineLearner where the subject is the daemon's plumbing, not learning:
    it learns nothing and counts the id of every sample it is handed, so "learned exactly
    once" is checked sample by sample rather than by a total."""

    def __init__(self, step_s: float = 0.0):
        self.step_s = step_s  # time a step takes: slower than the sensors fills the queue
        self.seen: Counter = Counter()
        self.labels: list = []
        self.samples_learned = 0
        self.steps = 0

    def learn_many(self, x, y) -> dict:
        time.sleep(self.step_s)
        self.seen.update(sample_ids(np.asarray(x)).tolist())
        self.labels.extend(label for label in dict.fromkeys(y) if label not in self.labels)
        self.samples_learned += len(y)
        self.steps += 1
        return {"n": len(y), "correct": 0, "loss": 0.0}

    def stats(self) -> dict:
        return {"samples_learned": self.samples_learned, "steps": self.steps,
                "skipped_steps": 0, "classes": list(self.labels)}

    def state_dict(self) -> dict:
        return {"seen": dict(self.seen), "labels": list(self.labels),
                "samples_learned": self.samples_learned, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.seen = Counter(state["seen"])
        self.labels = list(state["labels"])
        self.samples_learned, self.steps = state["samples_learned"], state["steps"]


def push_concurrently(address: str, sensors: int, samples: int, batch: int,
                      shape: tuple = (1, 8, 8), classes: int = 4, timeout: float = 0.5,
                      retries: int = 20) -> list[SensorResult]:
    """`sensors` threads, each pushing `samples` samples in batches of `batch` and waiting for
    every ack; a sensor that gives up records its error instead of raising."""
    results: list[SensorResult] = []
    lock = threading.Lock()
    start = threading.Barrier(sensors)

    def run(index: int) -> None:
        x, y = sensor_data(index, samples, shape, classes)
        client = SensorClient(address, sensor=f"load-{index}", timeout=timeout, retries=retries)
        error = None
        start.wait()
        try:
            for first in range(0, samples, batch):
                client.push(x[first:first + batch], y[first:first + batch])
            client.flush()
        except Exception as exc:  # recorded, and the test fails on it
            error = f"{type(exc).__name__}: {exc}"
        finally:
            client.close(flush=False)
        with lock:
            results.append(SensorResult(client.sensor, client.stats, error))

    threads = [threading.Thread(target=run, args=(i,), name=f"sensor-{i}")
               for i in range(sensors)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(results, key=lambda r: r.sensor)


class RssSampler:
    """Peak resident memory of a process, sampled every `interval` seconds in a thread."""

    def __init__(self, pid: int | None = None, interval: float = 0.05):
        import psutil

        self._process = psutil.Process(pid)
        self.start_rss = self.peak_rss = self._process.memory_info().rss
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak_rss = max(self.peak_rss, self._process.memory_info().rss)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        self.peak_rss = max(self.peak_rss, self._process.memory_info().rss)
        return self.peak_rss


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
