"""The daemon across restarts and crashes: nothing acked is lost, nothing is learned twice.

In-process daemons for restart continuity and disk errors; real `python -m edgecl serve`
processes killed with SIGKILL for the crash test (benchmarks/crash.py, fewer rounds).
"""
from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgecl.client import SensorClient, get_status
from edgecl.errors import UserError
from edgecl.serve import journal as journal_mod
from edgecl.cli.status import format_status
from edgecl.serve.daemon import Daemon
from edgecl.serve.journal import Journal
from edgecl.serve.queue import Batch
from edgecl.wire import ErrorCode
from test_daemon import DIGITS, LABELS, make_config, push_frames, raw_request, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import crash  # noqa: E402


def durable_config(tmp_path, **checkpoints):
    config = make_config(tmp_path, learn_batch=10)
    config.snapshots.every_samples = 0     # the held-out slice, no exports
    config.snapshots.heldout_every = 5
    for key, value in checkpoints.items():
        setattr(config.checkpoints, key, value)
    return config


def drained(daemon):
    return wait_for(lambda: (s := daemon.status())["queue_depth"] == 0 and s)


def replayed(daemon, samples: int) -> dict:
    """Status once the journal replay at start has learned `samples`."""
    return wait_for(lambda: (s := daemon.status())["checkpoint"]["replayed_samples"] == samples
                    and s)


def stop(daemon) -> None:
    daemon.stop()
    assert daemon.join(60) == 0


def test_restart_continues_offsets_labels_dedup_counters_and_held_out(tmp_path, run_daemons):
    first = run_daemons(durable_config(tmp_path))
    labels = [str(v) if v == 2 else v for v in LABELS[:60]]   # ints and a str label
    with SensorClient(first.address, sensor="cam", first_seq=1) as client:
        for start in range(0, 60, 20):
            client.push(DIGITS[start:start + 20], labels[start:start + 20])
    before = drained(first)
    stop(first)

    second = run_daemons(durable_config(tmp_path))
    after = second.status()
    assert after["checkpoint"]["restored_from"] == f"{60:020d}.ckpt"
    for key in ("samples_received", "samples_learned", "batches_received"):
        assert after[key] == before[key], key
    assert second.snapshots.heldout.state_dict()["counts"] == \
        first.snapshots.heldout.state_dict()["counts"] and len(second.snapshots.heldout) > 0
    assert second.learner.labels == first.learner.labels
    assert second.learner.samples_learned == first.learner.samples_learned
    retry = raw_request(second.address, *push_frames(DIGITS[20:40], labels[20:40],
                                                     sensor="cam", seq=2))
    assert retry["duplicate"] is True and retry["range"] == [20, 40]
    fresh = raw_request(second.address, *push_frames(DIGITS[:5], [0] * 5, sensor="cam", seq=9))
    assert fresh["range"] == [60, 65] and "duplicate" not in fresh
    assert drained(second)["samples_learned"] == 65


def test_a_journaled_push_never_acked_is_learned_once_and_its_retry_is_a_duplicate(
        tmp_path, run_daemons):
    # As if the daemon died right after the journal write, before it could ack or learn.
    journal = Journal(tmp_path / "state" / "journal")
    journal.open()
    journal.append(Batch("cam", 7, DIGITS[:12], LABELS[:12], first=0))
    journal.close()
    daemon = run_daemons(durable_config(tmp_path))
    assert replayed(daemon, 12)["samples_learned"] == 12
    retry = raw_request(daemon.address, *push_frames(DIGITS[:12], LABELS[:12], sensor="cam",
                                                     seq=7))
    assert retry["ok"] and retry["duplicate"] is True and retry["range"] == [0, 12]
    status = drained(daemon)
    assert status["samples_learned"] == status["samples_received"] == 12


def test_samples_learned_after_the_last_checkpoint_are_relearned_exactly(tmp_path,
                                                                          run_daemons):
    first = run_daemons(durable_config(tmp_path, every_steps=2, every_s=0))
    for seq in range(4):   # one push = one learner step of 10 (make_config: 1 iteration)
        assert raw_request(first.address, *push_frames(DIGITS[10 * seq:10 * seq + 10],
                                                       LABELS[10 * seq:10 * seq + 10],
                                                       sensor="cam", seq=seq))["ok"]
        wait_for(lambda: first.samples_learned == 10 * seq + 10)
    stop(first)
    checkpoints = first.keeper.store.paths()
    assert [int(p.stem) for p in checkpoints] == [20, 40]
    checkpoints[-1].unlink()   # as if killed after learning 20..40, before checkpointing it

    second = run_daemons(durable_config(tmp_path, every_steps=2, every_s=0))
    status = replayed(second, 20)
    assert status["checkpoint"]["restored_from"] == f"{20:020d}.ckpt"
    assert status["samples_learned"] == 40 == second.learner.samples_learned + \
        sum(second.snapshots.heldout.diverted.values())
    for (name, a), b in zip(first.learner.student.state_dict().items(),
                            second.learner.student.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_full_disk_refuses_pushes_with_storage_and_status_still_answers(tmp_path,
                                                                          run_daemons,
                                                                          monkeypatch):
    daemon = run_daemons(durable_config(tmp_path))
    assert raw_request(daemon.address, *push_frames(DIGITS[:4], LABELS[:4], seq=1))["ok"]

    def disk_full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(journal_mod, "_write_all", disk_full)
    reply = raw_request(daemon.address, *push_frames(DIGITS[:4], LABELS[:4], seq=2))
    assert not reply["ok"] and reply["error"] == ErrorCode.STORAGE
    assert "No space left on device" in reply["message"] and "\n" not in reply["message"]
    status = get_status(daemon.address)
    assert status["refused"][ErrorCode.STORAGE] == 1 and status["samples_received"] == 4
    assert "No space left on device" in status["journal"]["error"]
    assert "storage error" in format_status(status)
    monkeypatch.undo()
    assert raw_request(daemon.address, *push_frames(DIGITS[:4], LABELS[:4], seq=2))["ok"]
    assert drained(daemon)["samples_learned"] == 8


def test_an_unusable_state_dir_is_a_one_line_error(tmp_path):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "journal").write_text("a file where the journal directory goes")
    with pytest.raises(UserError, match="cannot use the journal") as caught:
        Daemon(durable_config(tmp_path))
    assert "\n" not in str(caught.value)


def test_one_daemon_per_state_dir(tmp_path, run_daemons):
    run_daemons(durable_config(tmp_path))
    with pytest.raises(UserError, match="another edgecl daemon is using"):
        Daemon(durable_config(tmp_path))


def test_state_directory_from_systemd_when_none_is_configured(tmp_path, monkeypatch):
    config = durable_config(tmp_path)
    config.serve.state_dir = ""
    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path / 'systemd'}:{tmp_path / 'other'}")
    daemon = Daemon(config)
    assert daemon.state_dir == tmp_path / "systemd"
    assert (tmp_path / "systemd" / "journal").is_dir()
    daemon.keeper.close()


def test_sigkill_at_random_moments_loses_nothing_and_learns_nothing_twice(tmp_path):
    result = crash.crash_run(tmp_path / "state", rounds=5, samples=2000, seed=1,
                             max_delay_s=2.0, say=lambda line: None)
    assert result["starts"] == 6 and len(result["kill_delays_s"]) == 5
    assert result["learner_samples"] + result["held_out"] == 2000
    versions = result["snapshot_versions"]
    assert versions == sorted(set(versions)) and len(versions) == 6


def test_journal_and_checkpoint_settings_are_checked():
    from edgecl.config import Config, apply

    config = Config()
    apply(config, "journal", "fsync", "interval", "--fsync")
    apply(config, "checkpoints", "every_steps", 10, "test")
    config.check()
    config.journal.fsync = "sometimes"
    with pytest.raises(UserError, match="journal.fsync: 'sometimes' is not one of batch, "
                                        "interval"):
        config.check()
    config.journal.fsync = "batch"
    config.checkpoints.every_s = -1.0
    with pytest.raises(UserError, match="checkpoints.every_s: must be >= 0"):
        config.check()


def test_duplicates_counted_after_the_last_checkpoint_survive_a_crash(tmp_path, run_daemons,
                                                                      monkeypatch):
    """samples_duplicate lived only in checkpoints: a crash before the next one lost it
    (20 pushes answered duplicate, 0 in status after the restart)."""
    first = run_daemons(durable_config(tmp_path, every_steps=1))
    assert raw_request(first.address, *push_frames(DIGITS[:4], LABELS[:4], seq=1))["ok"]
    wait_for(lambda: first.status()["checkpoint"]["covered"] == 4)
    # from here on no checkpoint is written, as when SIGKILL comes before the next one
    monkeypatch.setattr(type(first.keeper), "save", lambda self: None)
    for _ in range(5):
        reply = raw_request(first.address, *push_frames(DIGITS[:4], LABELS[:4], seq=1))
        assert reply["duplicate"] is True
    assert get_status(first.address)["samples_duplicate"] == 20
    stop(first)
    monkeypatch.undo()
    second = run_daemons(durable_config(tmp_path))
    assert second.status()["checkpoint"]["restored_from"] is not None
    assert get_status(second.address)["samples_duplicate"] == 20
    assert raw_request(second.address, *push_frames(DIGITS[:4], LABELS[:4], seq=1))["duplicate"]
    assert get_status(second.address)["samples_duplicate"] == 24


def test_a_restart_on_a_full_disk_is_a_one_line_error_and_rewrites_nothing(tmp_path,
                                                                           monkeypatch):
    """input_spec.json was rewritten at every start: ENOSPC, a 22-line traceback, exit 1."""
    config = durable_config(tmp_path)
    config.input.channels, config.input.height, config.input.width = 1, 8, 8
    daemon = Daemon(config).start()
    assert raw_request(daemon.address, *push_frames(DIGITS[:4], LABELS[:4], seq=1))["ok"]
    stop(daemon)
    spec_file = tmp_path / "state" / "input_spec.json"
    written = spec_file.stat().st_mtime_ns

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", disk_full)
    monkeypatch.setattr(Path, "write_bytes", disk_full)
    monkeypatch.setattr(journal_mod, "_write_all", disk_full)
    with pytest.raises(UserError, match="No space left on device") as caught:
        Daemon(config)
    assert "\n" not in str(caught.value) and "journal" in str(caught.value)
    assert spec_file.stat().st_mtime_ns == written
    monkeypatch.undo()
    again = Daemon(config).start()   # the disk has room again: starts as before
    assert get_status(again.address)["samples_received"] == 4
    stop(again)


def test_a_planted_checkpoint_is_refused_and_the_journal_still_replays(tmp_path, run_daemons,
                                                                       monkeypatch, caplog):
    from edgecl.serve.checkpoints import FORMAT
    from test_checkpoints import _Planted, plant

    first = run_daemons(durable_config(tmp_path, every_steps=1))
    with SensorClient(first.address, sensor="cam", first_seq=1) as client:
        client.push(DIGITS[:20], LABELS[:20])
        wait_for(lambda: first.status()["checkpoint"]["covered"] == 20)
        monkeypatch.setattr(type(first.keeper), "save", lambda self: None)
        client.push(DIGITS[20:40], LABELS[20:40])   # acked, in the journal, in no checkpoint
    drained(first)
    stop(first)
    monkeypatch.undo()
    checkpoints = tmp_path / "state" / "checkpoints"
    marker = tmp_path / "PWNED"
    plant(checkpoints / f"{40:020d}.ckpt", {"format": FORMAT, "covered": 40,
                                            "learner": _Planted(marker)})
    second = run_daemons(durable_config(tmp_path))
    status = replayed(second, 20)
    assert not marker.exists(), "the planted checkpoint ran code"
    assert status["checkpoint"]["restored_from"] == f"{20:020d}.ckpt"
    assert status["samples_received"] == 40 and drained(second)["samples_learned"] == 40
    refusals = [r.getMessage() for r in caplog.records if "refused to load" in r.getMessage()]
    assert len(refusals) == 1 and "\n" not in refusals[0] and "posix.system" in refusals[0]
    assert (checkpoints / f"{40:020d}.ckpt.refused").exists()


def test_a_state_dir_with_checkpoints_from_before_still_loads(tmp_path, run_daemons):
    """Checkpoints written before they were plain data (EDGECLC1: numpy pickled as numpy,
    the held-out slice's arrays) restore the daemon as they did."""

    from edgecl.serve import checkpoints as ckpt_mod
    from test_checkpoints import legacy_encode

    first = run_daemons(durable_config(tmp_path))
    with SensorClient(first.address, sensor="cam", first_seq=1) as client:
        client.push(DIGITS[:40], LABELS[:40])
    before = drained(first)
    stop(first)
    path = ckpt_mod.CheckpointStore(tmp_path / "state" / "checkpoints").paths()[-1]
    state = ckpt_mod.read_checkpoint(path)
    assert any(isinstance(v, np.ndarray) for _, v, _ in state["parts"]["heldout"]["slots"])
    path.write_bytes(legacy_encode(state))   # numpy arrays pickled as numpy objects
    assert path.read_bytes()[:8] == ckpt_mod.LEGACY_MAGIC
    second = run_daemons(durable_config(tmp_path))
    status = drained(second)
    assert status["checkpoint"]["restored_from"] == path.name
    assert status["samples_learned"] == before["samples_learned"] == 40
    assert len(second.snapshots.heldout) == len(first.snapshots.heldout) > 0
    reply = raw_request(second.address, *push_frames(DIGITS[:40], LABELS[:40], sensor="cam",
                                                     seq=1))
    assert reply["duplicate"] is True   # the dedup record came back too
