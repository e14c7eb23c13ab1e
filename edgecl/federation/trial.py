"""Split-MNIST cut into sites, for `edgecl federate local`, the integration test and
benchmarks/federation.py: which classes each site sees, its stream, and the pushes.

- `disjoint`: the ten digits, shuffled by `seed`, are cut into one group per site (3 sites:
  4, 3 and 3 classes); a site sees only its group.
- `overlap`: as disjoint, and each site also sees the first class of the next site's group,
  whose training digits the two sites share half and half.
Within a site, classes arrive one after another (class-incremental, no task boundaries
announced); the test digits of all ten classes are the same for every site.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from edgecl.data import load_mnist5k

SPLITS = ("disjoint", "overlap")
TRAIN_PER_CLASS = 400   # of MNIST-5k's 500 per class; the other 100 are the test digits


@dataclass
class SiteStream:
    name: str
    classes: list[int]
    x: np.ndarray
    y: np.ndarray


def class_groups(sites: int, seed: int) -> list[list[int]]:
    digits = np.random.default_rng([7, seed]).permutation(10).tolist()
    return [list(map(int, g)) for g in np.array_split(digits, sites)]


def _site_classes(groups: list[list[int]], split: str) -> list[list[int]]:
    if split == "disjoint":
        return [list(g) for g in groups]
    return [g + [groups[(i + 1) % len(groups)][0]] for i, g in enumerate(groups)]


def site_streams(sites: int, split: str = "disjoint", seed: int = 0,
                 train_per_class: int = 400) -> tuple[list[SiteStream], np.ndarray, np.ndarray]:
    """Each site's stream and the shared test set (the other 100 digits of every class)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    if not 2 <= sites <= 10:
        raise ValueError("sites must be 2..10")
    if not 1 <= train_per_class <= TRAIN_PER_CLASS:
        raise ValueError(f"train_per_class must be 1..{TRAIN_PER_CLASS}")
    x, y = load_mnist5k()
    rng = np.random.default_rng([11, seed])
    train, test = {}, []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        train[c] = list(idx[:train_per_class])
        test.extend(idx[TRAIN_PER_CLASS:])  # the same 100 per class whatever train_per_class
    classes = _site_classes(class_groups(sites, seed), split)
    holders = {c: [i for i, cs in enumerate(classes) if c in cs] for c in range(10)}
    out = []
    for i, cs in enumerate(classes):
        idx = []
        for c in cs:
            share = holders[c].index(i)
            part = train[c][share::len(holders[c])]
            idx.extend(rng.permutation(part))
        idx = np.asarray(idx, dtype=np.int64)
        out.append(SiteStream(f"site{i + 1}", cs, x[idx], y[idx]))
    test = np.asarray(test, dtype=np.int64)
    return out, x[test], y[test]


def interleaved(streams: list[SiteStream], chunks: int) -> tuple[np.ndarray, np.ndarray]:
    """All sites' samples as one central daemon would receive them: chunk k of every site,
    then chunk k+1, ..."""
    xs, ys = [], []
    for k in range(chunks):
        for s in streams:
            part = np.array_split(np.arange(len(s.y)), chunks)[k]
            xs.append(s.x[part])
            ys.append(s.y[part])
    return np.concatenate(xs), np.concatenate(ys)


def push_stream(address: str, stream: SiteStream, curve=None, batch: int = 32,
                seconds: float = 0.0) -> threading.Thread:
    """Push a site's stream to its daemon from a thread (a sensor), spread evenly over
    `seconds` (0: as fast as it is acked); errors end up in `thread.errors`."""
    import time

    from edgecl.client import SensorClient

    starts = range(0, len(stream.y), batch)
    gap = seconds / max(1, len(starts))

    def run() -> None:
        try:
            with SensorClient(address, sensor=f"{stream.name}-cam", curve=curve) as client:
                for start in starts:
                    client.push(stream.x[start:start + batch],
                                stream.y[start:start + batch].tolist())
                    time.sleep(gap)
        except Exception as exc:  # reported by whoever joins the thread
            thread.errors.append(str(exc))

    thread = threading.Thread(target=run, name=f"push-{stream.name}", daemon=True)
    thread.errors = []
    thread.start()
    return thread


@dataclass
class TrialResult:
    streams: list[SiteStream]
    results: dict           # the ServerApp's results file (per round: sites, bytes, seconds)
    learned: dict           # site -> samples_learned at the end
    received: dict          # site -> samples_received (acked) at the end
    rejected: dict          # site -> snapshots its parity gate refused (nothing published)
    int8_withheld: dict     # site -> snapshots published as fp32 alone (int8 refused)


def site_accuracy(results: dict, round_no: int, key: str = "accuracy") -> dict:
    """site -> accuracy of its newest snapshot after `round_no`'s merge (eval-npz runs);
    `key` "int8-accuracy": of its newest int8 model, what an int8 device runs."""
    sites = results["rounds"].get(str(round_no), {}).get("sites", {})
    return {name: m[key] for name, m in sites.items() if key in m}


def run_trial(workdir, sites: int = 3, split: str = "disjoint", rounds: int = 3,
              strategy: str = "class-aware", seed: int = 0, train_per_class: int = 400,
              secure: bool = True, daemon_args: list[str] = (), push_seconds: float = 0.0,
              local_timeout_s: float = 60.0, calibration: str = "features",
              progress=print) -> TrialResult:
    """A local federation on Split-MNIST: start it, push every site's stream (spread over
    `push_seconds`), run `rounds` rounds (between two, each site learns 1/rounds of its
    stream or waits `local_timeout_s`), wait until every acked sample is learned, stop
    everything."""
    from pathlib import Path

    from edgecl.client.connection import get_status
    from edgecl.federation.local import LocalFederation

    streams, test_x, test_y = site_streams(sites, split, seed, train_per_class)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    np.savez(workdir / "test.npz", x=test_x, y=test_y)
    per_round = max(1, min(len(s.y) for s in streams) // rounds)
    with LocalFederation(workdir, [s.name for s in streams], daemon_args, secure=secure,
                         eval_npz=str(workdir / "test.npz")) as fed:
        for s, site in zip(streams, fed.sites):
            progress(f"{s.name}: daemon {site.address}, classes {s.classes}, "
                     f"{len(s.y)} samples")
        pushers = [push_stream(site.address, s, site.sensor_curve, seconds=push_seconds)
                   for s, site in zip(streams, fed.sites)]
        results = fed.run({"num-rounds": rounds, "strategy": strategy,
                           "calibration": calibration,
                           "local-samples": per_round, "local-timeout-s": local_timeout_s})
        for t in pushers:
            t.join(600)
            if t.errors:
                raise RuntimeError(f"{t.name}: {t.errors[0]}")
        learned, received, rejected, withheld = {}, {}, {}, {}
        for site in fed.sites:
            status = _drained(site, get_status)
            learned[site.name] = status["samples_learned"]
            received[site.name] = status["samples_received"]
            rejected[site.name] = status.get("snapshots_rejected", 0)
            withheld[site.name] = status.get("snapshots_int8_withheld", 0)
    return TrialResult(streams, results, learned, received, rejected, withheld)


def _drained(site, get_status, timeout: float = 600.0) -> dict:
    """The site's status once its queue is empty."""
    import time

    curve = site.keys.get("node")
    deadline = time.monotonic() + timeout
    while True:
        status = get_status(site.address, 10.0, curve=curve)
        if status["queue_depth"] == 0 or time.monotonic() > deadline:
            return status
        time.sleep(0.5)
