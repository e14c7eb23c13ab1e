"""Fuzz: many generated malformed requests at one daemon, then valid traffic. Prints how many
were sent, how many got exactly one reply, how many got `internal` (target: 0), the codes
they got, any wrong answer or unechoed rid, whether `status` counted each refusal, whether
the valid samples that followed were learned, and the process's RSS.

    .venv/bin/python benchmarks/fuzz.py                       # 100,000 messages
    .venv/bin/python benchmarks/fuzz.py --messages 20000 --seed 7

The generator is tests/fuzz_messages.py (tests/test_fuzz.py sends 2,000 of them in the test
suite). The daemon runs in this process, in its own threads, configured by fuzz_config().
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()

    import logging
    logging.basicConfig(level=logging.ERROR)
    import numpy as np
    from hypothesis import HealthCheck, given, seed, settings

    from edgecl.client import SensorClient, get_status
    from edgecl.serve.daemon import Daemon
    from fuzz_messages import SHAPE, FuzzRun, fuzz_config, malformed, publish_fake_snapshot
    from load_sensors import RssSampler, wait_until

    with tempfile.TemporaryDirectory() as state:
        daemon = Daemon(fuzz_config(state)).start()
        publish_fake_snapshot(daemon)  # so chunk requests reach the file reads
        rss = RssSampler()
        before = get_status(daemon.address)["refused"]
        run = FuzzRun(daemon.address)

        @seed(args.seed)
        @settings(max_examples=args.messages, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(malformed)
        def fire(message):
            frames, expected = message
            run.send(frames, expected)

        load_at_start = round(os.getloadavg()[0], 2)
        started = time.monotonic()
        failure = None
        try:
            fire()
        except Exception as exc:  # a missing reply or an accepted message: report it
            failure = f"{type(exc).__name__}: {exc}"[:500]
        elapsed = time.monotonic() - started
        run.close()
        status = get_status(daemon.address)
        counted = {c: status["refused"][c] - before.get(c, 0) for c in status["refused"]}

        x = np.random.default_rng(args.seed).random((400, *SHAPE), dtype=np.float32)
        y = [i % 4 for i in range(400)]
        with SensorClient(daemon.address, sensor="after-fuzz") as client:
            for first in range(0, 400, 8):
                client.push(x[first:first + 8], y[first:first + 8])
        wait_until(lambda: get_status(daemon.address)["samples_learned"] >= 400, 300,
                   "the valid samples to be learned")
        after = get_status(daemon.address)
        peak = rss.stop()
        alive = daemon.join(0) is None
        daemon.stop()
        daemon.join(60)

    out = report(run, elapsed, load_at_start, failure, status, counted, alive, client, after,
                 rss, peak)
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    ok = (not failure and not run.mismatches and out["internal"] == 0
          and out["exactly_one_reply"] == run.sent and out["status_counts_match"] and alive
          and out["accepted_during_fuzz"] == 0 and after["samples_learned"] == 400)
    print("every message answered once with its code, 0 internal; valid traffic learned"
          if ok else "FAILED")
    return 0 if ok else 1


def report(run, elapsed, load_at_start, failure, status, counted, alive, client, after, rss,
           peak) -> dict:
    """The run's figures as printed and saved (--json)."""
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
                   f"{platform.python_version()}, {platform.system()}",
        "threads": 1, "load_avg_1m_at_start": load_at_start,
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        "messages": run.sent, "seconds": round(elapsed, 1),
        "exactly_one_reply": run.sent - run.unanswered - run.extra_replies,
        "no_reply": run.unanswered, "more_than_one_reply": run.extra_replies,
        "internal": run.codes.get("internal", 0),
        "per_s": round(run.sent / elapsed), "codes": dict(run.codes.most_common()),
        "wrong_codes": len(run.mismatches), "examples_of_wrong": run.mismatches[:5],
        "failure": failure,
        "status_counts_match": counted == {c: run.codes.get(c, 0) for c in counted},
        "accepted_during_fuzz": status["samples_received"],
        "daemon_alive": alive,
        "valid_after": {"acked": client.stats.acked_samples,
                        "learned": after["samples_learned"], "failed": after["samples_failed"]},
        "rss_mib": {"start": round(rss.start_rss / 2**20, 1), "peak": round(peak / 2**20, 1)},
    }


if __name__ == "__main__":
    sys.exit(main())
