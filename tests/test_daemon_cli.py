"""`edgecl serve | push | status` as a user runs them: real processes, signals, exit codes."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest

from edgecl.client import SensorClient, get_status

PY = sys.executable
SERVE_FLAGS = ["--bind", "127.0.0.1", "--method", "finetune", "--buffer-size", "20",
               "--set", "learner.threads=1", "--stats-interval-s", "0.05",
               "--set", "learner.iterations=1"]  # plumbing tests: one step per batch


class ServeProcess:
    """`edgecl serve --port 0` in a subprocess; its log is collected by a reader thread so the
    pipe never fills, and the port is read from the 'listening on' line."""

    def __init__(self, tmp_path, *extra):
        self.proc = subprocess.Popen(
            [PY, "-m", "edgecl", "serve", "--port", "0", "--state-dir", str(tmp_path / "state"),
             *SERVE_FLAGS, *extra],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            match = next((re.search(r"listening on tcp://[\d.]+:(\d+)", line)
                          for line in self.lines if "listening on" in line), None)
            if match:
                self.port = int(match.group(1))
                self.address = f"tcp://127.0.0.1:{self.port}"
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.kill()
        raise AssertionError("daemon did not start:\n" + "".join(self.lines))

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def run_cli(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "edgecl", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def serve(tmp_path):
    started = []

    def start(*extra) -> ServeProcess:
        process = ServeProcess(tmp_path, *extra)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


def test_sigterm_learns_the_queue_and_exits_zero_leaving_no_process(serve):
    daemon = serve()
    pid = daemon.proc.pid
    x = np.random.default_rng(0).integers(0, 256, (96, 1, 8, 8), dtype=np.uint8)
    with SensorClient(daemon.address, sensor="s") as client:
        client.push(x, [i % 3 for i in range(96)])
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(60) == 0, daemon.log
    daemon._reader.join(5)
    assert "stopped: 96 samples received, 96 learned" in daemon.log
    assert "Traceback" not in daemon.log
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not [c for c in psutil.Process().children(recursive=True) if c.pid == pid]


def test_push_and_status_commands(serve, tmp_path):
    daemon = serve()
    rng = np.random.default_rng(1)
    npz = tmp_path / "data.npz"
    np.savez(npz, x=rng.integers(0, 256, (100, 1, 8, 8), dtype=np.uint8),
             y=np.array(["a", "b"] * 50))
    pushed = run_cli("push", str(npz), "--to", daemon.address, "--batch", "32", "--limit", "90",
                     "--sensor", "cli", "--no-progress")
    assert pushed.returncode == 0, pushed.stderr
    assert "pushed 90 samples in 3 batches" in pushed.stdout and "acked 90" in pushed.stdout
    assert "refused 0" in pushed.stdout

    deadline = time.monotonic() + 60
    while get_status(daemon.address)["samples_learned"] < 90 and time.monotonic() < deadline:
        time.sleep(0.1)
    shown = run_cli("status", "--from", daemon.address, "--json")
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    for key in ("samples_received", "samples_learned", "queue_depth", "classes",
                "prequential_acc", "prequential_acc_window", "per_class_acc", "buffer_fill",
                "steps_per_s", "uptime_s", "snapshot_version"):
        assert key in status
    assert status["samples_received"] == 90 and status["samples_learned"] == 90
    assert sorted(status["classes"]) == ["a", "b"]
    table = run_cli("status", "--from", daemon.address)
    assert table.returncode == 0 and "90 received, 90 learned, 0 queued" in table.stdout
    assert "'a'" in table.stdout


def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys):
    """In-process through cli.main: the same path as the console script, without startup cost."""
    from edgecl.cli import main

    def run(*argv) -> str:
        code = main(list(argv))
        err = capsys.readouterr().err
        assert code == 2, err
        assert "Traceback" not in err
        return err.strip().splitlines()[-1]

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    try:
        line = run("serve", "--port", str(port), "--state-dir", str(tmp_path / "s"),
                   *SERVE_FLAGS)
    finally:
        blocker.close()
    assert line.startswith(f"edgecl: error: port {port}") and "already in use" in line

    bad = tmp_path / "bad.toml"
    bad.write_text("[serve]\nqueue_megabytes = 3\n")
    assert "serve.queue_megabytes" in run("serve", "--config", str(bad))
    assert "learner.buffer_sise" in run("serve", "--port", "0", "--state-dir",
                                        str(tmp_path / "s"), "--set", "learner.buffer_sise=3")
    assert "no such file" in run("push", str(tmp_path / "missing.npz"),
                                 "--to", "tcp://127.0.0.1:1")
    assert "--batch" in run("push", "mnist5k", "--batch", "0")
    assert "no reply" in run("status", "--from", "tcp://127.0.0.1:1", "--timeout", "0.2",
                             "--retries", "0")


def journal_unlearned(state_dir, n: int, batch: int = 50) -> None:
    """A state directory holding `n` acked samples nobody learned: a daemon killed early."""
    from edgecl.serve.journal import Journal
    from edgecl.serve.queue import Batch

    x = np.random.default_rng(0).integers(0, 256, (n, 1, 8, 8), dtype=np.uint8)
    journal = Journal(state_dir / "journal", fsync="interval")
    journal.open()
    for first in range(0, n, batch):
        journal.append(Batch("old", first, x[first:first + batch],
                             [(first + i) % 3 for i in range(batch)], first=first))
    journal.close()


def test_acks_start_before_the_learner_loads_and_the_replay_checkpoints(serve, tmp_path):
    journal_unlearned(tmp_path / "state", 2000)
    daemon = serve()
    x = np.zeros((4, 1, 8, 8), dtype=np.uint8)
    with SensorClient(daemon.address, sensor="new", timeout=10) as client:
        client.push(x, [0, 1, 2, 0])
        client.flush()
        early = get_status(daemon.address)
    assert early["learner_state"] == "loading", early   # acked while torch was still loading
    assert early["samples_received"] == 2004 and early["checkpoint"]["replayed_samples"] == 0
    done = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done = get_status(daemon.address)
        if done["samples_learned"] == 2004:
            break
        time.sleep(0.2)
    assert done["samples_learned"] == 2004 and done["learner_state"] == "learning"
    assert done["checkpoint"]["replayed_samples"] == 2000
    assert done["checkpoint"]["covered"] >= 2000     # a crash now would not replay them again
