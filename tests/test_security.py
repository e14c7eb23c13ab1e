"""CURVE: keygen, key-file errors, and a daemon that admits only listed clients on both its
request and its announcement socket. Strangers get no answer: the client's timeout ends it."""
from __future__ import annotations

import logging
import stat
import time

import numpy as np
import pytest
import zmq

from edgecl.cli import main as cli_main
from edgecl.client import (Connection, DaemonUnavailable, DeviceClient, RequestRefused,
                           SensorClient, get_status, new_socket)
from edgecl.config import Config
from edgecl.errors import UserError
from edgecl.export.device import _pub_address
from edgecl.security import client_curve, keygen, load_key_pair
from edgecl.serve.daemon import Daemon

X = np.random.default_rng(0).integers(0, 256, (16, 1, 8, 8), dtype=np.uint8)
Y = [i % 2 for i in range(16)]
STRANGER_TIMEOUT_S = 0.5


@pytest.fixture
def keys(tmp_path):
    """server pair, two admitted sensors, one stranger whose public key is not listed."""
    keydir, allowed = tmp_path / "keys", tmp_path / "clients"
    keygen(keydir)
    allowed.mkdir()
    for name in ("cam1", "cam2", "stranger"):
        public, _ = keygen(keydir, name)
        if name != "stranger":
            (allowed / public.name).write_bytes(public.read_bytes())
    return keydir, allowed


def curve_config(tmp_path, keydir=None, allowed=None) -> Config:
    """A tiny daemon; with CURVE when given the key directory and the allow-list."""
    config = Config()
    config.serve.port = 0
    config.serve.bind = "127.0.0.1"
    config.serve.state_dir = str(tmp_path / "state")
    config.serve.stats_interval_s = 0.05
    if keydir is not None:
        config.serve.curve_secret = str(keydir / "server.key_secret")
        config.serve.allow_clients = str(allowed)
    config.learner = {"buffer_size": 0, "method": "finetune", "threads": 1}
    return config


def as_client(keydir, name):
    return client_curve(str(keydir / "server.key"), str(keydir / f"{name}.key_secret"))


# ------------------------------------------------------------------------------ keygen

def test_keygen_writes_a_private_secret_and_refuses_to_overwrite(tmp_path, capsys):
    assert cli_main(["keygen", str(tmp_path), "--name", "cam1"]) == 0
    secret = tmp_path / "cam1.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    pair = load_key_pair(secret)
    assert len(pair.public) == len(pair.secret) == 40
    assert (tmp_path / "cam1.key").read_text().count("secret-key") == 0
    assert "--curve-key" in capsys.readouterr().out

    assert cli_main(["keygen", str(tmp_path), "--name", "cam1"]) == 2
    assert "already exist" in capsys.readouterr().err
    assert load_key_pair(secret) == pair  # untouched
    assert cli_main(["keygen", str(tmp_path), "--name", "cam1", "--force"]) == 0
    assert load_key_pair(secret) != pair
    assert cli_main(["keygen", str(tmp_path), "--name", "../evil"]) == 2
    assert not list(tmp_path.glob(".keygen-*")), "scratch directory left behind"


# ------------------------------------------------------------------------------ bad key files

def test_key_file_mistakes_are_one_line_errors(tmp_path, keys):
    keydir, allowed = keys
    (tmp_path / "garbage.key").write_text("not a key\n")
    (tmp_path / "short.key").write_text('curve\n    public-key = "abc"\n')
    empty = tmp_path / "empty"
    empty.mkdir()

    def refused(**serve) -> str:
        config = curve_config(tmp_path, keydir, allowed)
        for key, value in serve.items():
            setattr(config.serve, key, value)
        with pytest.raises(UserError) as info:
            Daemon(config)
        assert "\n" not in str(info.value)
        return str(info.value)

    assert "does not exist" in refused(curve_secret=str(tmp_path / "missing.key_secret"))
    assert "only a public key" in refused(curve_secret=str(keydir / "server.key"))
    assert "not a CURVE key file" in refused(curve_secret=str(tmp_path / "garbage.key"))
    assert "Z85" in refused(curve_secret=str(tmp_path / "short.key"))
    assert "does not exist" in refused(allow_clients=str(tmp_path / "nowhere"))
    assert "no *.key files" in refused(allow_clients=str(empty))
    assert "go together" in refused(allow_clients="")
    assert "go together" in refused(curve_secret="")

    with pytest.raises(UserError, match="both --curve-server-key"):
        client_curve(str(keydir / "server.key"), None)
    with pytest.raises(UserError, match="only a public key"):
        client_curve(str(keydir / "server.key"), str(keydir / "cam1.key"))


def test_require_curve_refuses_to_start_without_it(tmp_path, capsys):
    code = cli_main(["serve", "--port", "0", "--state-dir", str(tmp_path / "s"),
                     "--require-curve"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "require_curve" in err and len(err.splitlines()) == 1


def test_a_daemon_without_curve_warns_at_start(tmp_path, run_daemons, caplog):
    config = curve_config(tmp_path)
    with caplog.at_level(logging.WARNING, logger="edgecl.serve"):
        daemon = run_daemons(config)
        assert daemon.wait_bound()
    assert any("CURVE is off" in r.getMessage() for r in caplog.records)
    assert get_status(daemon.address)["curve"] is False


# ------------------------------------------------------------------------------ the gate

def test_only_listed_clients_can_push_or_pull(tmp_path, keys, run_daemons):
    keydir, allowed = keys
    daemon = run_daemons(curve_config(tmp_path, keydir, allowed))
    address = daemon.address

    with SensorClient(address, sensor="cam1", curve=as_client(keydir, "cam1")) as client:
        client.push(X, Y)
    assert client.stats.acked_samples == len(Y)

    strangers = {"no key": None, "unlisted key": as_client(keydir, "stranger"),
                 "wrong server key": client_curve(str(keydir / "cam2.key"),
                                                  str(keydir / "cam2.key_secret"))}
    for what, curve in strangers.items():
        started = time.monotonic()
        sensor = SensorClient(address, sensor=what, curve=curve, timeout=STRANGER_TIMEOUT_S,
                              retries=0)
        with pytest.raises(DaemonUnavailable):
            sensor.push(X, Y)
            sensor.flush()
        sensor.close(flush=False)
        with pytest.raises(DaemonUnavailable):
            DeviceClient(address, tmp_path / "out" / what.replace(" ", "_"), curve=curve,
                         timeout=STRANGER_TIMEOUT_S, retries=0).pull()
        with pytest.raises(DaemonUnavailable):
            get_status(address, timeout=STRANGER_TIMEOUT_S, retries=0, curve=curve)
        assert time.monotonic() - started < 20 * STRANGER_TIMEOUT_S, f"{what}: hung"

    cam2 = as_client(keydir, "cam2")
    status = get_status(address, curve=cam2)
    assert status["curve"] is True
    assert status["samples_received"] == len(Y)  # nothing from a stranger got in
    assert status["sensors"] == 1
    assert status["curve_refused"] >= 2  # the unlisted key's handshakes, at least one each op
    info = DeviceClient(address, tmp_path / "out" / "cam2", curve=cam2).info()
    assert "version" in info  # the snapshot ops answer a listed device


def test_announcements_reach_only_listed_subscribers(tmp_path, keys, run_daemons):
    keydir, allowed = keys
    daemon = run_daemons(curve_config(tmp_path, keydir, allowed))
    pub = _pub_address(daemon.address)
    ctx = zmq.Context.instance()
    subs = {name: new_socket(ctx, pub, curve, zmq.SUB)
            for name, curve in (("cam1", as_client(keydir, "cam1")), ("plain", None),
                                ("stranger", as_client(keydir, "stranger")))}
    try:
        for sock in subs.values():
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        got = {name: 0 for name in subs}
        deadline = time.monotonic() + 10
        while got["cam1"] < 3 and time.monotonic() < deadline:  # PUB drops until joined
            daemon.announce("snapshot", {"version": 1})
            time.sleep(0.05)
            for name, sock in subs.items():
                while sock.poll(0):
                    sock.recv_multipart()
                    got[name] += 1
        assert got["cam1"] >= 3
        time.sleep(0.2)
        for name in ("plain", "stranger"):
            assert not subs[name].poll(0) and got[name] == 0, f"{name} heard an announcement"
    finally:
        for sock in subs.values():
            sock.close(linger=0)


def test_cli_clients_take_their_keys(tmp_path, keys, run_daemons, capsys):
    keydir, allowed = keys
    daemon = run_daemons(curve_config(tmp_path, keydir, allowed))
    np.savez(tmp_path / "data.npz", x=X, y=np.array(Y))
    flags = ["--curve-server-key", str(keydir / "server.key"),
             "--curve-key", str(keydir / "cam1.key_secret")]
    assert cli_main(["push", str(tmp_path / "data.npz"), "--to", daemon.address,
                     "--no-progress", "--sensor", "cli", *flags]) == 0
    assert cli_main(["status", "--from", daemon.address, "--json", *flags]) == 0
    assert '"curve": true' in capsys.readouterr().out
    assert cli_main(["status", "--from", daemon.address, *flags]) == 0
    assert "CURVE, 0 unlisted keys refused" in capsys.readouterr().out
    assert cli_main(["status", "--from", daemon.address, "--timeout", "0.3", "--retries", "0",
                     "--curve-key", str(keydir / "cam1.key_secret")]) == 2
    assert cli_main(["status", "--from", daemon.address, "--timeout", "0.3",
                     "--retries", "0"]) == 2
    with Connection(daemon.address, curve=as_client(keydir, "cam2")) as conn:
        assert conn.request("status")["status"]["samples_received"] == len(Y)


# ------------------------------------------------------------------------------ roles

ROLE_OPS = {"push": ("sensor",), "snapshot.info": ("device",), "snapshot.chunk": ("device",),
            "snapshot.export": ("admin",), "snapshot.rollback": ("admin",),
            "status": ("admin",), "model.get": ("federation", "admin"),
            "model.merge": ("federation", "admin"), "ping": None}
# Answers that show the role was let through (no sample was learned: there is no model yet).
LET_THROUGH = {"model.get": ("no_model",), "model.merge": ("no_model",)}


@pytest.fixture
def role_keys(tmp_path):
    """server pair, and one key per role, each in its own directory."""
    keydir = tmp_path / "keys"
    keygen(keydir)
    dirs = {}
    for role in ("sensor", "device", "admin", "federation"):
        public, _ = keygen(keydir, role)
        dirs[role] = tmp_path / f"{role}s"
        dirs[role].mkdir()
        (dirs[role] / public.name).write_bytes(public.read_bytes())
    return keydir, dirs


def role_config(tmp_path, keydir, dirs) -> Config:
    config = curve_config(tmp_path)
    config.serve.curve_secret = str(keydir / "server.key_secret")
    config.serve.allow_sensors = str(dirs["sensor"])
    config.serve.allow_devices = str(dirs["device"])
    config.serve.allow_admins = str(dirs["admin"])
    config.serve.allow_federation = str(dirs["federation"])
    return config


def _request(address, curve, op) -> str:
    """One request as `op` needs it; returns "ok" or the error code."""
    fields = {"snapshot.chunk": {"version": 1, "file": "meta.json"},
              "model.merge": {"labels": [0], "arrays": [{"name": "head.bias",
                                                         "dtype": "float32", "shape": [1]}]},
              }.get(op, {})
    payload = b"\x00" * 4 if op == "model.merge" else None
    if op == "push":
        from edgecl.wire import push_header
        fields = {k: v for k, v in push_header("cam", time.time_ns(), X, Y).items()
                  if k not in ("v", "op")}
        payload = X.tobytes()
    with Connection(address, timeout=5, retries=0, curve=curve) as conn:
        try:
            conn.request(op, payload, **fields)
            return "ok"
        except RequestRefused as exc:
            return exc.code


@pytest.mark.parametrize("role", ["sensor", "device", "admin", "federation"])
def test_each_role_may_do_its_ops_and_is_refused_the_others(tmp_path, role_keys, run_daemons,
                                                            role):
    keydir, dirs = role_keys
    daemon = run_daemons(role_config(tmp_path, keydir, dirs))
    publish_fake = __import__("fuzz_messages").publish_fake_snapshot
    publish_fake(daemon)
    publish_fake(daemon)  # two versions, so a rollback has one to go back to
    curve = as_client(keydir, role)
    refused = 0
    for op, needed in ROLE_OPS.items():
        got = _request(daemon.address, curve, op)
        if needed is None or role in needed:
            assert got != "forbidden", (role, op, got)
            if op != "snapshot.chunk":   # a fake version's meta may be pruned; any answer
                assert got in ("ok", *LET_THROUGH.get(op, ())), (role, op, got)
        else:
            assert got == "forbidden", (role, op, got)
            refused += 1
    admin = get_status(daemon.address, curve=as_client(keydir, "admin"))
    assert admin["refused_by_role"][role] == refused
    assert admin["refused"]["forbidden"] == refused
    assert admin["samples_received"] == (len(Y) if role == "sensor" else 0)


def test_a_sensor_key_cannot_subscribe_to_announcements(tmp_path, role_keys, run_daemons):
    keydir, dirs = role_keys
    daemon = run_daemons(role_config(tmp_path, keydir, dirs))
    pub = _pub_address(daemon.address)
    received = {}
    for role in ("sensor", "device"):
        sock = zmq.Context.instance().socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        as_client(keydir, role).apply(sock)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(pub)
        received[role] = sock
    time.sleep(0.5)  # handshakes and subscriptions
    for _ in range(10):
        daemon.announce("snapshot", {"version": 99})
        time.sleep(0.05)
    assert received["device"].poll(2000), "a device key heard nothing"
    assert not received["sensor"].poll(300), "a sensor key heard an announcement"
    for sock in received.values():
        sock.close()
    status = get_status(daemon.address, curve=as_client(keydir, "admin"))
    assert status["refused_by_role"]["sensor"] >= 1


def test_a_single_directory_keeps_every_role_and_warns(tmp_path, keys, run_daemons, caplog):
    keydir, allowed = keys
    with caplog.at_level(logging.WARNING):
        daemon = run_daemons(curve_config(tmp_path, keydir, allowed))
    assert any("has every role" in r.getMessage() for r in caplog.records)
    curve = as_client(keydir, "cam1")
    for op in ROLE_OPS:
        assert _request(daemon.address, curve, op) in ("ok", "bad_request", "not_found",
                                                       "no_model")
    assert get_status(daemon.address, curve=curve)["refused_by_role"] == {
        "sensor": 0, "device": 0, "admin": 0, "federation": 0}


def test_role_directories_without_a_server_key_are_refused():
    config = Config()
    config.serve.allow_sensors = "/somewhere"
    with pytest.raises(UserError, match="go together"):
        config.check()


def test_status_text_shows_refusals_by_role(tmp_path, role_keys, run_daemons):
    from edgecl.cli.status import format_status
    keydir, dirs = role_keys
    daemon = run_daemons(role_config(tmp_path, keydir, dirs))
    assert _request(daemon.address, as_client(keydir, "sensor"), "snapshot.rollback") == \
        "forbidden"
    text = format_status(get_status(daemon.address, curve=as_client(keydir, "admin")))
    assert "forbidden by role: sensor 1" in text
