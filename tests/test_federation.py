"""model.get, model.merge and model.stats end to end: a real daemon on loopback (ephemeral
ports), the real OnlineLearner (tiny), the lean ModelClient."""
from __future__ import annotations

import threading

import msgpack
import numpy as np
import pytest

from edgecl.client import ModelClient, RequestRefused, SensorClient, get_status, ping
from edgecl.wire import PROTOCOL_VERSION, ErrorCode, pack

from test_daemon import make_config, raw_request, wait_for

RNG = np.random.default_rng(0)
X = RNG.integers(0, 256, (400, 1, 8, 8), dtype=np.uint8)


@pytest.fixture
def start(tmp_path, run_daemons):
    """A daemon (snapshots off unless asked) that has learned `n` samples of classes 0..2."""
    def go(n=60, snapshots=False, method="finetune", **serve):
        config = make_config(tmp_path, **serve)
        config.snapshots.enabled = snapshots
        config.learner["method"] = method
        daemon = run_daemons(config)
        if n:
            push(daemon, X[:n], [i % 3 for i in range(n)])
        return daemon
    return go


def push(daemon, x, labels, sensor="cam"):
    with SensorClient(daemon.address, sensor=sensor) as client:
        for start in range(0, len(labels), 20):
            client.push(x[start:start + 20], labels[start:start + 20])
    target = daemon.samples_received
    wait_for(lambda: get_status(daemon.address)["samples_learned"] == target)


def global_model(site, order=None, extra=(), scale=1.0):
    """A global model made from the site's: rows in `order`, `extra` labels with rows that
    win every prediction (bias 100)."""
    labels = list(order if order is not None else site.labels)
    arrays = {}
    for name, value in site.arrays.items():
        if name.startswith("head."):
            rows = [value[site.labels.index(label)] * scale for label in labels]
            fill = 100.0 if name == "head.bias" else 0.0
            rows += [np.full(value.shape[1:], fill, np.float32) for _ in extra]
            arrays[name] = np.stack(rows).astype(np.float32)
        else:
            arrays[name] = (value * scale).astype(np.float32)
    return labels + list(extra), arrays


def merge_frames(labels, arrays, payload=None, **changes) -> list[bytes]:
    header = {"v": PROTOCOL_VERSION, "op": "model.merge", "labels": labels,
              "arrays": [{"name": k, "dtype": "float32", "shape": list(v.shape)}
                         for k, v in arrays.items()], **changes}
    data = b"".join(np.ascontiguousarray(v, "<f4").tobytes() for v in arrays.values())
    return [pack(header), data if payload is None else payload]


def test_get_returns_the_learners_weights_and_counts(start):
    daemon = start(n=90)
    with ModelClient(daemon.address) as client:
        site = client.get_model()
    learner = daemon.learner
    assert site.labels == [0, 1, 2] and site.counts == [30, 30, 30]
    assert site.samples_learned == 90 == site.learned_since_merge and site.merges == 0
    assert site.arch.startswith("sha256:")
    names = [k for k, v in learner.student.state_dict().items() if v.is_floating_point()]
    assert list(site.arrays) == names
    for name, value in learner.model_arrays():
        np.testing.assert_array_equal(site.arrays[name], value, err_msg=name)


def test_a_28px_student_is_read_whole(start):
    """The size the brief quotes: mbv2-w0.35 on 28x28 is ~1-2 MB in one reply."""
    daemon = start(n=0)
    x = RNG.integers(0, 256, (20, 1, 28, 28), dtype=np.uint8)
    push(daemon, x, [0, 1] * 10)
    site = ModelClient(daemon.address).get_model()
    nbytes = sum(a.nbytes for a in site.arrays.values())
    assert 500_000 < nbytes < 4_000_000
    for name, value in daemon.learner.model_arrays():
        np.testing.assert_array_equal(site.arrays[name], value)


def test_before_any_sample_both_ops_say_no_model(start):
    daemon = start(n=0)
    client = ModelClient(daemon.address)
    with pytest.raises(RequestRefused) as exc:
        client.get_model()
    assert exc.value.code == ErrorCode.NO_MODEL
    with pytest.raises(RequestRefused) as exc:
        client.merge([0], {"w": np.zeros(1, np.float32)})
    assert exc.value.code == ErrorCode.NO_MODEL


def test_merge_aligns_labels_by_name_grows_the_head_and_the_site_predicts_new_labels(start):
    daemon = start(method="derpp+ewcpp")
    client = ModelClient(daemon.address)
    site = client.get_model()
    labels, arrays = global_model(site, order=[2, 0, 1], extra=["new"])
    reply = client.merge(labels, arrays, counts=[5, 5, 5, 7], merge_id="r1")
    assert reply["merged"] and reply["labels"] == [0, 1, 2, "new"] and reply["merges"] == 1
    after = client.get_model()
    assert after.labels == [0, 1, 2, "new"] and after.counts == [20, 20, 20, 0]
    assert after.merges == 1 and after.learned_since_merge == 0
    assert after.arch == site.arch
    for i, label in enumerate(labels):  # each global row landed on its label's site row
        np.testing.assert_allclose(after.arrays["head.weight"][after.labels.index(label)],
                                   arrays["head.weight"][i])
    learner = daemon.learner
    assert learner.last_consolidation == learner.steps  # a consolidation point
    ewc = next(t for t in learner.terms if t.name == "ewcpp")
    for name, anchor in ewc.anchor.items():
        np.testing.assert_allclose(anchor.numpy(), after.arrays[name])
    assert len(learner.buffer) == 20  # the replay buffer is kept
    # the site now predicts the new label (its bias wins): prequential accuracy on it is 1
    push(daemon, X[100:110], ["new"] * 10)
    status = get_status(daemon.address)
    assert {e["label"]: e["acc"] for e in status["per_class_acc"]}["new"] == 1.0


def test_a_repeated_merge_id_is_not_applied_twice(start):
    daemon = start()
    client = ModelClient(daemon.address)
    labels, arrays = global_model(client.get_model(), scale=0.5)
    assert client.merge(labels, arrays, merge_id="round-1")["merges"] == 1
    again = client.merge(labels, arrays, merge_id="round-1")
    assert again["duplicate"] is True and again["merged"] is True
    assert client.get_model().merges == 1
    assert client.merge(labels, arrays, merge_id="round-2")["merges"] == 2
    queued = client.merge(labels, arrays, merge_id="round-3", wait_ms=0)
    assert queued["queued"] is True
    wait_for(lambda: client.get_model().merges == 3)


def test_pushes_around_merges_are_all_learned_exactly_once(start):
    daemon = start(n=30)
    client = ModelClient(daemon.address)
    labels, arrays = global_model(client.get_model(), extra=["m"])
    labels = [int(v) if not isinstance(v, str) else v for v in labels]
    done = threading.Event()

    def pushing():
        with SensorClient(daemon.address, sensor="busy") as sensor:
            for start_at in range(30, 330, 10):
                sensor.push(X[start_at:start_at + 10], [i % 3 for i in range(10)])
        done.set()

    thread = threading.Thread(target=pushing)
    thread.start()
    merges = 0
    while not done.is_set() or merges < 3:
        client.merge(labels, arrays, merge_id=f"m{merges}")
        merges += 1
    thread.join()
    wait_for(lambda: get_status(daemon.address)["samples_learned"] == 330)
    status = get_status(daemon.address)
    assert status["samples_received"] == 330 and status["samples_duplicate"] == 0
    site = client.get_model()
    assert site.merges == merges and site.samples_learned == 330 == sum(site.counts)


BAD = {
    "wrong name": (lambda l, a: (l, {("x" + k if i == 0 else k): v
                                     for i, (k, v) in enumerate(a.items())}), {},
                   ErrorCode.BAD_REQUEST),
    "missing array": (lambda l, a: (l, dict(list(a.items())[:-1])), {}, ErrorCode.BAD_REQUEST),
    "wrong shape": (lambda l, a: (l, {k: (v[..., :1] if k == "head.weight" else v)
                                      for k, v in a.items()}), {}, ErrorCode.BAD_SHAPE),
    "head rows": (lambda l, a: (l[:2], a), {}, ErrorCode.BAD_SHAPE),
    "bad label": (lambda l, a: ([0, 1, 2.5], a), {}, ErrorCode.BAD_LABEL),
    "repeated label": (lambda l, a: ([0, 1, 1], a), {}, ErrorCode.BAD_LABEL),
    "bad counts": (lambda l, a: (l, a), {"counts": [1, -1, 2]}, ErrorCode.BAD_REQUEST),
    "long merge_id": (lambda l, a: (l, a), {"merge_id": "x" * 129}, ErrorCode.BAD_REQUEST),
    "bad dtype": (lambda l, a: (l, a), {"_dtype": "float64"}, ErrorCode.BAD_DTYPE),
}


def test_bad_merges_get_their_codes_and_the_daemon_keeps_serving(start):
    daemon = start(max_classes=4)
    client = ModelClient(daemon.address)
    site = client.get_model()
    labels, arrays = global_model(site)
    for what, (change, fields, code) in BAD.items():
        bad_labels, bad_arrays = change(labels, arrays)
        frames = merge_frames(bad_labels, bad_arrays,
                              **{k: v for k, v in fields.items() if k != "_dtype"})
        if "_dtype" in fields:
            frames = merge_frames(bad_labels, bad_arrays)
            import msgpack
            header = msgpack.unpackb(frames[0])
            header["arrays"][0]["dtype"] = fields["_dtype"]
            frames[0] = pack(header)
        reply = raw_request(daemon.address, *frames)
        assert reply.get("error") == code, (what, reply)
    good = merge_frames(labels, arrays)
    cases = {
        "short payload": ([good[0], good[1][:-4]], ErrorCode.BAD_SHAPE),
        "missing payload frame": ([good[0]], ErrorCode.BAD_REQUEST),
        "too many classes": (merge_frames(*global_model(site, extra=["a", "b"])),
                             ErrorCode.TOO_MANY_CLASSES),
    }
    nan = np.frombuffer(good[1], "<f4").copy()
    nan[5] = np.nan
    cases["NaN"] = ([good[0], nan.tobytes()], ErrorCode.BAD_VALUE)
    for what, (frames, code) in cases.items():
        reply = raw_request(daemon.address, *frames)
        assert reply.get("error") == code, (what, reply)
    status = get_status(daemon.address)
    assert status["refused"]["internal"] == 0
    assert ping(daemon.address)["ok"]
    assert client.get_model().merges == 0  # nothing was applied
    assert client.merge(labels, arrays)["merged"]


def test_stats_returns_the_buffers_class_moments_and_merges_nothing(start):
    daemon = start(n=60, method="derpp", max_classes=4)
    client = ModelClient(daemon.address)
    site = client.get_model()
    labels, arrays = global_model(site, order=[2, 0, 1], extra=["a", "b", "c"], scale=1.1)
    stats = client.class_stats(labels, arrays)  # 6 labels > max_classes: nothing is added
    learner = daemon.learner
    assert sorted(stats.labels) == [0, 1, 2] and sum(stats.counts) == len(learner.buffer)
    dim = learner.student.head.in_features
    assert stats.mean.shape == stats.var.shape == (3, dim)
    assert np.isfinite(stats.mean).all() and (stats.var >= 0).all()
    after = client.get_model()
    assert after.merges == 0 and after.labels == [0, 1, 2]
    for name, value in site.arrays.items():
        np.testing.assert_array_equal(after.arrays[name], value, err_msg=name)
    frames = merge_frames(labels, arrays)
    frames[0] = pack({**msgpack.unpackb(frames[0]), "op": "model.stats"})
    cases = {"missing payload frame": ([frames[0]], ErrorCode.BAD_REQUEST),
             "short payload": ([frames[0], frames[1][:-4]], ErrorCode.BAD_SHAPE)}
    for what, (sent, code) in cases.items():
        reply = raw_request(daemon.address, *sent)
        assert reply.get("error") == code, (what, reply)
    assert get_status(daemon.address)["refused"]["internal"] == 0


def test_a_checkpoint_after_a_merge_restores_the_merged_weights(tmp_path, run_daemons):
    config = make_config(tmp_path)
    config.snapshots.enabled = False
    daemon = run_daemons(config)
    push(daemon, X[:60], [i % 3 for i in range(60)])
    client = ModelClient(daemon.address)
    labels, arrays = global_model(client.get_model(), extra=["g"], scale=0.9)
    client.merge(labels, arrays, merge_id="r9")
    merged = client.get_model()
    daemon.stop()
    assert daemon.join(60) == 0
    again = run_daemons(make_config(tmp_path))
    client = ModelClient(again.address)
    restored = wait_for(lambda: _get_or_none(client))
    assert restored.merges == 1 and restored.labels == merged.labels
    assert restored.counts == merged.counts
    for name, value in merged.arrays.items():
        np.testing.assert_array_equal(restored.arrays[name], value, err_msg=name)
    assert client.merge(labels, arrays, merge_id="r9").get("duplicate") is True
    assert client.get_model().merges == 1


def _get_or_none(client):
    try:
        return client.get_model()
    except RequestRefused as exc:
        assert exc.code == ErrorCode.NO_MODEL  # the layout comes with the first idle turn
        return None


def test_a_merge_publishes_a_snapshot_without_new_samples(start):
    from edgecl.client import Connection
    daemon = start(snapshots=True, n=0)
    daemon.config.snapshots.every_s = 0
    push(daemon, X[:200], [i % 3 for i in range(200)])
    with Connection(daemon.address, timeout=120) as conn:
        first = conn.request("snapshot.export", wait_ms=110_000)
    assert first["outcome"] == "published", first
    client = ModelClient(daemon.address)
    labels, arrays = global_model(client.get_model())
    client.merge(labels, arrays)
    wait_for(lambda: (get_status(daemon.address)["snapshot_version"] or 0) > first["version"],
             timeout=120)
    meta = daemon.snapshots.store.meta(daemon.snapshots.store.latest())
    assert meta.get("trigger") == "merge"


def test_federation_bn_is_checked_with_a_clear_error(tmp_path):
    from edgecl.config import Config, load
    from edgecl.errors import UserError
    config = Config()
    config.federation.bn = "median"
    with pytest.raises(UserError, match="federation.bn: 'median' is not one of global, local, "
                                        "refresh"):
        config.check()
    path = tmp_path / "edgecl.toml"
    path.write_text('[federation]\nbn = "refresh"\n')
    assert load(path).federation.bn == "refresh"
    path.write_text('[federation]\nbn = 3\n')
    with pytest.raises(UserError, match="federation.bn: expected str"):
        load(path)
