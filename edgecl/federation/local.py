"""A whole federation on one box, for trying it out, the integration test and the benchmark:
one edgecl daemon per site, a SuperLink, one SuperNode beside each daemon, and `flwr run`.

With `secure=True` (the default) every link is authenticated as on real boxes: the SuperLink
serves TLS with a private CA and admits only registered SuperNode keys (Flower's node
authentication), and each daemon is a CURVE server that admits its SuperNode's key in the
`federation` and `admin` roles and the site's sensor key in the `sensor` role.

Every process is started in its own process group and stopped with it (`stop`, or leaving
the `with` block), children included: SuperExec and the ClientApp/ServerApp processes.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgecl.errors import UserError
from edgecl.federation.credentials import make_node_key, make_tls
from edgecl.security import ClientCurve, keygen, load_key_pair, load_public_key

log = logging.getLogger("edgecl.federation")

APP_DIR = Path(__file__).parent / "app"
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0
LINK_NAME = "edgecl-local"


def free_port() -> int:
    """A TCP port free on loopback now (Flower's servers take no port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_bin(name: str) -> str:
    """A Flower executable from this Python's environment (SuperLink starts SuperExec by
    name, so that directory also goes first on the children's PATH)."""
    path = Path(sys.executable).parent / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        raise UserError(f"{name} not found: install the federation extra "
                        "(pip install 'edgecl[federation]')")
    return found


class Process:
    """A child in its own process group, its output in a log file."""

    def __init__(self, name: str, args: list[str], log_path: Path, env: dict):
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env,
                                     start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = START_TIMEOUT_S) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.text())
            if match:
                return match
            if not self.alive():
                break
            time.sleep(0.1)
        raise UserError(f"{self.name} did not start (log {self.log_path}):\n"
                        + self.text()[-2000:])

    def stop(self) -> None:
        """SIGTERM to the whole group, then SIGKILL to what is left of it."""
        for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
            try:  # the leader is gone; its children may not be
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            break
        self._log.close()


@dataclass
class SiteProcesses:
    name: str
    daemon: Process
    address: str
    state_dir: Path
    sensor_curve: ClientCurve | None = None
    node: Process | None = None
    keys: dict = field(default_factory=dict)


class LocalFederation:
    """`sites` daemons (`edgecl serve` with `daemon_args`), a SuperLink and a SuperNode per
    site, under `workdir`. `start()`, then `run()` as often as wanted, then `stop()`."""

    def __init__(self, workdir: str | Path, sites: list[str], daemon_args: list[str] = (),
                 secure: bool = True, eval_npz: str | None = None):
        self.workdir = Path(workdir)
        self.site_names = list(sites)
        self.daemon_args = list(daemon_args)
        self.secure = secure
        self.eval_npz = eval_npz
        self.sites: list[SiteProcesses] = []
        self.link: Process | None = None
        self.link_port = 0
        self.env = {**os.environ, "FLWR_HOME": str(self.workdir / "flwr-home"),
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}"
                            f"{os.environ.get('PATH', '')}"}
        self.tls = None

    # -- start and stop ---------------------------------------------------------------------
    def start(self) -> "LocalFederation":
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            for name in self.site_names:
                self.sites.append(self._start_daemon(name))
            self._start_link()
            for site in self.sites:
                self._start_node(site)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every process this federation started (nodes first, then link, daemons)."""
        for proc in [s.node for s in self.sites] + [self.link] + [s.daemon for s in self.sites]:
            if proc is not None:
                proc.stop()

    def __enter__(self) -> "LocalFederation":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _daemon_curve_args(self, site_dir: Path, name: str, keys: dict) -> list[str]:
        """The daemon's CURVE server key; the SuperNode's key gets the federation and admin
        roles, the site's sensor key the sensor role."""
        keys_dir = site_dir / "keys"
        server_public, server_secret = keygen(keys_dir, "daemon")
        args = ["--curve-secret", str(server_secret)]
        for client, roles in (("node", ("federation", "admin", "device")),
                              ("sensor", ("sensor",))):
            public, secret = keygen(keys_dir, client)
            keys[client] = ClientCurve(load_public_key(str(server_public), "daemon key"),
                                       load_key_pair(str(secret), f"{client} key"))
            keys[f"{client}-secret"] = secret
            for role in roles:
                role_dir = site_dir / f"allow-{role}"
                role_dir.mkdir(exist_ok=True)
                shutil.copy(public, role_dir / public.name)
                args += [f"--allow-{role}s" if role != "federation" else "--allow-federation",
                         str(role_dir)]
        keys["server-public"] = server_public
        return args

    def _start_daemon(self, name: str) -> SiteProcesses:
        site_dir = self.workdir / name
        site_dir.mkdir(parents=True, exist_ok=True)
        keys: dict = {}
        curve = self._daemon_curve_args(site_dir, name, keys) if self.secure else []
        args = [sys.executable, "-m", "edgecl", "serve", "--port", "0", "--bind", "127.0.0.1",
                "--state-dir", str(site_dir / "state"), *curve, *self.daemon_args]
        proc = Process(f"daemon {name}", args, site_dir / "daemon.log", self.env)
        port = int(proc.wait_for(r"listening on tcp://[\d.]+:(\d+)").group(1))
        return SiteProcesses(name, proc, f"tcp://127.0.0.1:{port}", site_dir / "state",
                             sensor_curve=keys.get("sensor"), keys=keys)

    def _flower_config(self) -> None:
        """The `flwr` CLI's connection to this SuperLink, in this federation's FLWR_HOME."""
        home = self.workdir / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", f'default = "{LINK_NAME}"', "", f"[superlink.{LINK_NAME}]",
                 f'address = "127.0.0.1:{self.link_port}"']
        lines.append(f'root-certificates = "{self.tls.ca_cert}"' if self.secure
                     else "insecure = true")
        (home / "config.toml").write_text("\n".join(lines) + "\n")

    def _start_link(self) -> None:
        self.link_port = free_port()
        args = [flower_bin("flower-superlink"), "--port", str(self.link_port),
                "--disable-runtime-dependency-installation"]  # state in memory: a file
        # database under load answered "database is locked" to the ServerApp
        if self.secure:
            self.tls = make_tls(self.workdir / "tls", ["127.0.0.1", "localhost"])
            args += ["--ssl-certfile", str(self.tls.server_cert), "--ssl-keyfile",
                     str(self.tls.server_key), "--ssl-ca-certfile", str(self.tls.ca_cert),
                     "--enable-supernode-auth"]
        else:
            args.append("--insecure")
        self._flower_config()
        self.link = Process("flower-superlink", args, self.workdir / "superlink.log", self.env)
        self.link.wait_for(r"Uvicorn running on")

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """The `flwr` CLI against this SuperLink."""
        return subprocess.run([flower_bin("flwr"), *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def _node_config(self, site: SiteProcesses) -> str:
        cfg = {"daemon": site.address, "name": site.name}
        if self.secure:
            cfg["curve-server-key"] = str(site.keys["server-public"])
            cfg["curve-key"] = str(site.keys["node-secret"])
        if self.eval_npz:
            cfg["eval-npz"] = str(self.eval_npz)
        return " ".join(f"{k}={json.dumps(v)}" for k, v in cfg.items())

    def _start_node(self, site: SiteProcesses) -> None:
        args = [flower_bin("flower-supernode"), "--superlink", f"127.0.0.1:{self.link_port}",
                "--port", str(free_port()), "--node-config", self._node_config(site)]
        if self.secure:
            private, public = make_node_key(self.workdir / "node-keys", site.name)
            done = self.flwr("supernode", "register", str(public), LINK_NAME)
            if done.returncode != 0:
                raise UserError(f"flwr supernode register failed for {site.name}:\n"
                                f"{done.stdout}{done.stderr}")
            args += ["--root-certificates", str(self.tls.ca_cert),
                     "--auth-supernode-private-key", str(private)]
        else:
            args.append("--insecure")
        site.node = Process(f"flower-supernode {site.name}", args,
                            self.workdir / site.name / "supernode.log", self.env)
        site.node.wait_for(r"SuperNode ID")

    # -- runs -------------------------------------------------------------------------------
    def write_app(self, run_config: dict) -> Path:
        """A copy of edgecl's Flower App whose run config is `run_config` over the defaults."""
        app = self.workdir / "app"
        app.mkdir(exist_ok=True)
        shutil.copy(APP_DIR / "pyproject.toml", app / "pyproject.toml")
        return app

    def run(self, run_config: dict, timeout: float = 3600.0) -> dict:
        """`flwr run` edgecl's app with `run_config`; returns the ServerApp's results file."""
        results = self.workdir / f"results-{int(time.time() * 1000)}.json"
        config = {**run_config, "min-sites": len(self.sites), "results-file": str(results)}
        overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())
        app = self.write_app(config)
        done = self.flwr("run", str(app), LINK_NAME, "--stream", "--run-config", overrides,
                         timeout=timeout)
        (self.workdir / "flwr-run.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0 or not results.exists():
            raise UserError(f"flwr run failed (log {self.workdir / 'flwr-run.log'}):\n"
                            f"{(done.stdout + done.stderr)[-3000:]}")
        return json.loads(results.read_text())
