"""A state directory written by edgecl 0.1.0 (tests/fixtures/state-0.1.0, made by
tests/fixtures/make_state_dir.py) still loads: checkpoint, journal tail, dedup record, input
spec and time series. A change to a file format that breaks this breaks every upgrade."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

from edgecl.client import SensorClient, get_status
from test_daemon import wait_for

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "state-0.1.0"
sys.path.insert(0, str(FIXTURE.parent))
import make_state_dir  # noqa: E402  (the settings it was written with)

TOTAL = make_state_dir.LEARNED + make_state_dir.TAIL


def test_the_0_1_0_state_directory_loads_replays_and_learns_on(tmp_path, run_daemons):
    state_dir = tmp_path / "state"
    shutil.copytree(FIXTURE, state_dir)
    daemon = run_daemons(make_state_dir.config(state_dir))
    status = wait_for(lambda: (s := daemon.status())["checkpoint"]["replayed_samples"]
                      == make_state_dir.TAIL and s["steps"] and s)  # learner stats out too
    assert status["checkpoint"]["restored_from"] == f"{make_state_dir.LEARNED:020d}.ckpt"
    assert status["samples_learned"] == status["samples_received"] == TOTAL
    assert status["samples_failed"] == 0
    assert status["input_spec"] == {"channels": 1, "height": 8, "width": 8, "dtype": "uint8"}
    assert sorted(status["classes"]) == [0, 1, 2]
    assert 0 < status["buffer_fill"] <= 4   # the buffer came back with the learner
    assert status["sensors"] == 3, status

    x, y = make_state_dir.digits(make_state_dir.LEARNED // 2, 1)
    with SensorClient(daemon.address, sensor="cam-a", first_seq=1) as client:
        client.push(x[:3], y[:3])              # seqs 1 and 2, acked before 0.1.0 stopped:
        client.push(x[3:], y[3:])              # duplicates
        client.push(np.zeros((2, 1, 8, 8), np.uint8), [0, 1])   # seq 3: new
    assert client.stats.duplicates == 2
    status = wait_for(lambda: (s := get_status(daemon.address))["samples_learned"] == TOTAL + 2
                      and s)
    assert status["samples_duplicate"] == 6 and status["samples_received"] == TOTAL + 2
    assert (state_dir / "timeseries.jsonl").read_text().count('"k":"start"') == 2
