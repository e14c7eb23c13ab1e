"""`edgecl status --watch`: a real terminal (tmux) shows the live view redrawn in place with
rates, following a running daemon, until Ctrl-C ends it with exit 0."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from edgecl.client import SensorClient
from edgecl.cli.status import REDRAW, rates_text
from export_helpers import blob_images
from test_snapshots_e2e import make_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_rates_come_from_two_statuses():
    before = {"samples_received": 100, "samples_learned": 50, "steps": 5, "batches_received": 2}
    after = {"samples_received": 300, "samples_learned": 150, "steps": 15, "batches_received": 6}
    assert rates_text(None, 0.0, after) == "(from the next redraw on)"
    assert rates_text((10.0, before), 12.0, after) == \
        "100.0 received/s, 50.0 learned/s, 5.0 steps/s, 2.0 pushes/s"


def test_watch_redraws_in_place_until_ctrl_c(run_daemons, tmp_path):
    daemon = run_daemons(make_config(tmp_path))
    watch = subprocess.Popen(
        [sys.executable, "-m", "edgecl", "status", "--watch", "--interval", "0.2",
         "--from", daemon.address], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": ROOT}, text=True)
    try:
        x, y = blob_images(30, seed=0)
        time.sleep(1.0)
        with SensorClient(daemon.address, sensor="cam") as client:
            client.push(x[:40], y[:40])
        time.sleep(1.5)
    finally:
        watch.send_signal(signal.SIGINT)
        out, err = watch.communicate(timeout=90)  # a loaded 2-core box starts python slowly
    assert watch.returncode == 0, err
    frames = out.split(REDRAW)[1:]
    assert len(frames) >= 5
    assert all("edgecl status --watch" in f and "Ctrl-C to stop" in f for f in frames)
    assert "0 received" in frames[0] and "(from the next redraw on)" in frames[0]
    assert "40 received" in frames[-2]  # the last whole frame follows the daemon
    assert any("received/s" in f and not f.split("rates")[1].startswith("  0.0 received/s")
               for f in frames[1:]), "no frame showed the push as a rate"
    assert "Traceback" not in err


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")
def test_watch_in_a_real_terminal(run_daemons, tmp_path):
    daemon = run_daemons(make_config(tmp_path))
    session = f"edgecl-watch-{os.getpid()}"
    command = (f"PYTHONPATH={ROOT} {sys.executable} -m edgecl status --watch --interval 0.2 "
               f"--from {daemon.address}; echo exit=$?; sleep 30")
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "40",
                    command], check=True)
    try:
        time.sleep(2.0)
        screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session],
                                capture_output=True, text=True, check=True).stdout
        assert screen.count("edgecl status --watch") == 1  # redrawn in place, not scrolled
        assert "rates" in screen and "received/s" in screen
        subprocess.run(["tmux", "send-keys", "-t", session, "C-c"], check=True)
        time.sleep(1.0)
        screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session],
                                capture_output=True, text=True, check=True).stdout
        assert "exit=0" in screen
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
