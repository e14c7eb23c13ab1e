"""A real federation on loopback: a SuperLink, 3 SuperNodes and 3 edgecl daemons, each daemon
fed a different part of Split-MNIST, with TLS, Flower's node authentication and CURVE.

Each round the server's head calibration queries every site's class statistics; after the
rounds every site's newest ONNX snapshot knows all ten digits and scores on the classes of
the other sites; no acked sample is lost; every process started is stopped."""
from __future__ import annotations

import psutil
import pytest

from edgecl.federation.trial import run_trial, site_accuracy

ROUNDS = 3
# one step per batch and a short stream: plumbing, not accuracy (benchmarks/federation.py).
# Such a model's merged snapshot has logit margins too small for the int8 parity gate (it
# would keep the pre-merge snapshot); the gate has its own tests (test_export_gate.py)
DAEMON_ARGS = ["--set", "learner.iterations=1", "--set", "learner.threads=1",
               "--set", "snapshots.gate_min_int8_agreement=0.0",
               "--set", "snapshots.gate_max_accuracy_drop=1.0",
               "--set", "snapshots.gate_max_abs_logit=1.0"]


@pytest.mark.timeout(900)
def test_three_sites_federate_and_every_snapshot_knows_all_ten_digits(tmp_path):
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    trial = run_trial(tmp_path, sites=3, split="disjoint", rounds=ROUNDS, train_per_class=40,
                      daemon_args=DAEMON_ARGS, local_timeout_s=5.0,
                      progress=lambda line: None)
    names = [s.name for s in trial.streams]
    last = site_accuracy(trial.results, ROUNDS)
    assert sorted(last) == sorted(names), trial.results["rounds"][str(ROUNDS)]
    assert trial.results["labels"] == list(range(10))
    for name, metrics in trial.results["rounds"][str(ROUNDS)]["sites"].items():
        assert metrics["classes"] == 10, (name, metrics)   # the pulled ONNX snapshot's head
    for stream in trial.streams:
        assert trial.received[stream.name] == len(stream.y)       # every push acked ...
        assert trial.learned[stream.name] == len(stream.y)        # ... and learned once
    rounds = trial.results["rounds"]
    for r in range(1, ROUNDS + 1):
        assert rounds[str(r)]["bytes_up"] > 0 and rounds[str(r)]["bytes_down"] >= 0
        # every site answered the head calibration's query (model.stats through Flower)
        assert rounds[str(r)]["calibrated"]["sites"] == 3, rounds[str(r)]
        assert rounds[str(r)]["calibrated"]["labels"] >= 3
    left = {p.pid for p in psutil.Process().children(recursive=True)} - before
    assert not left, f"processes left running: {left}"
