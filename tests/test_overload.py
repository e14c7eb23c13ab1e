"""What the daemon does when sensors push faster than it learns (serve.overload)."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from edgecl.learn import LearnerConfig, OnlineLearner
from edgecl.serve.daemon import FIRST_STEP_S
from edgecl.serve.journal import Journal
from edgecl.serve.queue import Batch, BusyLine, IngestQueue
from edgecl.wire import ErrorCode
from test_daemon import DIGITS, LABELS, make_config, push_frames, raw_request, wait_for
from test_durability import drained, replayed, stop


def batch(first: int, n: int, sensor: str = "cam") -> Batch:
    return Batch(sensor, first, DIGITS[:n], LABELS[:n], first=first)


# ------------------------------------------------------------------ the parts


def test_take_behind_leaves_the_newest_samples_and_keeps_stream_order():
    queue = IngestQueue(2**30)
    for first in range(0, 100, 20):
        assert queue.try_put(batch(first, 20))
    behind = queue.take_behind(keep_samples=50)
    assert [b.first for b in behind] == [0, 20]   # 60 stay: a third batch would leave 40
    assert queue.waiting == 60 and queue.samples == 100   # taken, not yet done
    assert [b.first for b in queue.take(1000, 0)] == [40, 60, 80]
    assert queue.take_behind(keep_samples=0) == []


def test_a_sample_bound_refuses_like_the_byte_bound_but_an_empty_queue_takes_anything():
    queue = IngestQueue(2**30)
    queue.limit_samples = 30
    assert queue.try_put(batch(0, 50))           # empty: taken whatever its size
    assert not queue.has_room(64, 1)
    queue.done(queue.take(1000, 0))
    assert queue.try_put(batch(50, 20)) and not queue.try_put(batch(70, 20))
    assert queue.free_batches(nbytes=64, n=10) == 1


def test_the_busy_line_admits_sensors_in_the_order_they_were_refused():
    line = BusyLine(expire_s=10)
    line.refused("a", now=0.0)
    line.refused("b", now=0.1)
    assert not line.admits("b", fits=1, now=0.2)     # a waited longer
    assert not line.admits("c", fits=1, now=0.2)     # a newcomer waits too
    line.refused("c", now=0.2)
    assert line.admits("a", fits=1, now=0.3)
    assert line.admits("b", fits=1, now=0.3) and line.admits("c", fits=1, now=0.3)
    assert len(line) == 0 and line.admits("d", fits=1, now=0.4)
    line.refused("a", now=1.0)
    assert line.admits("z", fits=2, now=1.1)         # room for the line and for z
    assert not line.admits("z", fits=1, now=1.1)
    assert line.admits("z", fits=1, now=20.0)        # a stopped retrying: it left the line


@pytest.mark.parametrize("offer_logits", ["forward", "none"])
def test_offered_samples_enter_the_buffer_untrained_with_the_chosen_logits(offer_logits):
    learner = OnlineLearner(LearnerConfig(method="derpp", buffer_size=50, threads=1,
                                          offer_logits=offer_logits))
    learner.learn_many(DIGITS[:10], LABELS[:10])
    before = {k: v.clone() for k, v in learner.student.state_dict().items()}
    steps = learner.steps
    admitted = learner.offer_many(DIGITS[10:200], [7] * 190)   # a label never trained on
    assert admitted > 0 and learner.samples_offered == 190 and learner.samples_learned == 10
    assert 7 in learner.labels and learner.buffer.seen == 200
    assert learner.steps == steps                           # no optimizer step was taken
    for key, value in learner.student.state_dict().items():
        if not key.startswith("head"):   # the head grew a row for label 7; nothing else moved
            assert value.equal(before[key]), key
    offered = learner.buffer.y[:len(learner.buffer)] == learner.index[7]
    widths = learner.buffer.logit_width[:len(learner.buffer)][offered]
    assert (widths == (len(learner.labels) if offer_logits == "forward" else 0)).all()
    learner.learn_many(DIGITS[:10], LABELS[:10])  # replay draws with and without logits work
    assert learner.skipped_steps == 0


# ------------------------------------------------------------------ the daemon


def realtime_config(tmp_path, **serve):
    config = make_config(tmp_path, overload="realtime", learn_batch=10, **serve)
    config.snapshots.every_samples = 0
    config.learner["buffer_size"] = 40
    return config


def test_realtime_acks_everything_and_offers_what_it_has_no_time_for(tmp_path, run_daemons):
    daemon = run_daemons(realtime_config(tmp_path))
    release = threading.Event()
    daemon.add_learner_hook(lambda learner, n, final: final or release.wait(30))
    replies = [raw_request(daemon.address, *push_frames(DIGITS[i:i + 16], LABELS[i:i + 16],
                                                        seq=i))
               for i in range(0, 256, 16)]
    assert all(r["ok"] for r in replies)                    # never busy
    release.set()
    status = drained(daemon)
    assert status["overload"] == "realtime" and status["refused"][ErrorCode.BUSY] == 0
    assert status["samples_offered"] > 0 and status["samples_learned"] > 0
    assert status["samples_learned"] + status["samples_offered"] == 256
    assert daemon.learner.buffer.seen == 256                # the buffer saw the whole stream


def test_backpressure_serves_the_sensor_refused_first_first(tmp_path, run_daemons):
    daemon = run_daemons(make_config(tmp_path, queue_mb=48 * 64 / 2**20, learn_batch=16,
                                     max_lag_s=1e9))   # the memory bound alone
    steps = threading.Semaphore(0)   # after each step the learner waits for a permit
    daemon.add_learner_hook(lambda learner, n, final: final or steps.acquire(timeout=30))

    def push(sensor, seq):
        return raw_request(daemon.address, *push_frames(DIGITS[:16], LABELS[:16],
                                                        sensor=sensor, seq=seq))
    def settled_after(permits: int, full: int) -> bool:
        """The learner at rest after `permits` permits: it has learned permits + 1 batches and
        waits in the last one's hook, with the batches before it freed. Only this state is
        stable; the ones between are too short to poll for on a fast machine."""
        learned = daemon.status()["samples_learned"] == 16 * (permits + 1)
        return learned and daemon.queue.bytes < full

    assert push("a", 0)["ok"] and push("a", 1)["ok"] and push("a", 2)["ok"]   # queue full
    full = daemon.queue.bytes
    assert push("late", 0)["error"] == ErrorCode.BUSY     # refused first: first in line
    assert push("b", 0)["error"] == ErrorCode.BUSY
    steps.release()                                       # room for one push
    wait_for(lambda: settled_after(1, full))
    assert push("b", 0)["error"] == ErrorCode.BUSY         # room, but it is late's turn
    assert push("late", 0)["ok"]
    steps.release()
    wait_for(lambda: settled_after(2, full))
    assert push("b", 0)["ok"]
    for _ in range(10):
        steps.release()


def test_a_realtime_restart_consumes_the_journal_once_and_checkpoints_after(tmp_path,
                                                                            run_daemons):
    journal = Journal(tmp_path / "state" / "journal")
    journal.open()
    for first in range(0, 200, 20):   # as if acked at 10x the learning rate, then killed
        journal.append(Batch("cam", first, DIGITS[first:first + 20], LABELS[first:first + 20],
                             first=first))
    journal.close()
    daemon = run_daemons(realtime_config(tmp_path))
    status = replayed(daemon, 200)
    assert status["samples_learned"] + status["samples_offered"] == 200
    # the replay runs before any step is timed: it keeps max_lag_s at the assumed step time,
    # 2 s * 10 / 0.4 s = 50 samples, so the last three pushes are trained and the rest offered
    assert FIRST_STEP_S == 0.4 and daemon.config.serve.max_lag_s == 2.0
    assert status["samples_learned"] == 60 and status["samples_offered"] == 140
    assert status["checkpoint"]["path"] == f"{200:020d}.ckpt"   # written right after replay
    retry = raw_request(daemon.address, *push_frames(DIGITS[:20], LABELS[:20], sensor="cam",
                                                     seq=40))
    assert retry["duplicate"] is True
    stop(daemon)
    again = run_daemons(realtime_config(tmp_path))
    assert again.status()["samples_offered"] == status["samples_offered"]  # nothing replayed
    assert np.array_equal(again.learner.buffer.y, daemon.learner.buffer.y)


def test_backpressure_queues_at_most_max_lag_s_of_learning(tmp_path, run_daemons):
    daemon = run_daemons(make_config(tmp_path, learn_batch=10, max_lag_s=2.0))
    release = threading.Event()
    daemon.add_learner_hook(lambda learner, n, final: final or release.wait(30))
    assert daemon.status()["queue_limit_samples"] == 50   # 2 s at the assumed 0.4 s a step
    replies = [raw_request(daemon.address, *push_frames(DIGITS[:16], LABELS[:16], seq=s))
               for s in range(4)]
    release.set()
    assert [r["ok"] for r in replies] == [True, True, True, False]   # 64 > 50 samples
    assert replies[3]["error"] == ErrorCode.BUSY and "in line" in replies[3]["message"]
