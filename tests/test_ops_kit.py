"""deploy/prometheus and deploy/grafana, checked by the real tools: Debian's promtool
(check config, check rules, the alert unit tests, and every dashboard query parsed as PromQL),
every metric name they use exposed by a real daemon's /metrics, and, when Debian's prometheus
runs here, a real Prometheus scraping a running daemon with the shipped config and rules.
.ci/run installs the package; without it the promtool tests skip (and .ci/run says why)."""
from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from edgecl.client import Connection, SensorClient
from export_helpers import blob_images
from test_snapshots_e2e import make_config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PROM = DEPLOY / "prometheus"
CONFIG, RULES, RULE_TESTS = PROM / "prometheus.yml", PROM / "edgecl-alerts.yml", \
    PROM / "edgecl-alerts.test.yml"
DASHBOARD = DEPLOY / "grafana" / "edgecl-dashboard.json"
PROMTOOL, PROMETHEUS = shutil.which("promtool"), shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed "
                                    "(Debian package prometheus; .ci/run installs it)")
METRIC = re.compile(r"\bedgecl_[a-z_]+\b")


def promtool(*args: str, cwd: Path = PROM) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def dashboard_queries() -> list[str]:
    """Every query of the dashboard, with Grafana's variables given concrete values."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"].replace("$__rate_interval", "1m").replace("$instance", ".*")
            for p in panels for t in p["targets"]]


def alert_names() -> list[str]:
    return re.findall(r"^\s*- alert:\s*(\w+)", RULES.read_text(), re.M)


@needs_promtool
def test_promtool_accepts_the_scrape_config_and_the_rules():
    done = promtool("check", "config", CONFIG.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout and "1 rule files found" in done.stdout
    done = promtool("check", "rules", RULES.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in done.stdout


@needs_promtool
def test_every_alert_has_a_passing_unit_test():
    tested = set(re.findall(r"alertname:\s*(\w+)", RULE_TESTS.read_text()))
    assert set(alert_names()) == tested
    assert {"EdgeclLearnerFallingBehind", "EdgeclSnapshotRejected", "EdgeclStorageError",
            "EdgeclCurveRefusalsRising"} <= tested
    done = promtool("test", "rules", RULE_TESTS.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


@needs_promtool
def test_every_dashboard_query_is_valid_promql(tmp_path):
    queries = dashboard_queries()
    assert len(queries) >= 10
    rules = ["groups:", "  - name: dashboard", "    rules:"]
    for i, expr in enumerate(queries):
        rules += [f"      - record: dashboard:query_{i}", f"        expr: {json.dumps(expr)}"]
    (tmp_path / "dashboard-rules.yml").write_text("\n".join(rules) + "\n")
    done = promtool("check", "rules", "dashboard-rules.yml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return reply.read().decode()


@pytest.fixture
def busy_daemon(run_daemons, tmp_path):
    """A daemon with /metrics on, 120 samples learned and snapshot 1 published."""
    config = make_config(tmp_path)
    config.serve.metrics_port = free_port()
    daemon = run_daemons(config)
    x, y = blob_images(30, seed=0)
    with SensorClient(daemon.address, sensor="cam") as client:
        for i in range(0, len(y), 20):
            client.push(x[i:i + 20], y[i:i + 20])
    with Connection(daemon.address, timeout=65, retries=0) as conn:
        assert conn.request("snapshot.info", since=0, wait_ms=60_000)["version"] == 1
    return daemon, config.serve.metrics_port


def test_the_kit_uses_only_metric_names_the_daemon_exposes(busy_daemon):
    _, port = busy_daemon
    exposed = set(re.findall(r"^(edgecl_[a-z_]+)", get(f"http://127.0.0.1:{port}/metrics"),
                             re.M))
    used = set(METRIC.findall(RULES.read_text())) | set(METRIC.findall(DASHBOARD.read_text()))
    assert used and not used - exposed, f"not exposed: {sorted(used - exposed)}"


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (Debian package)")
def test_a_real_prometheus_scrapes_the_daemon_with_the_shipped_config(busy_daemon, tmp_path):
    daemon, metrics_port = busy_daemon
    text = CONFIG.read_text().replace("127.0.0.1:9464", f"127.0.0.1:{metrics_port}")
    text = text.replace("scrape_interval: 15s", "scrape_interval: 1s").replace(
        "evaluation_interval: 15s", "evaluation_interval: 1s").replace(
        "scrape_timeout: 5s", "scrape_timeout: 1s")
    (tmp_path / "prometheus.yml").write_text(text)
    shutil.copy(RULES, tmp_path / RULES.name)
    web = free_port()
    server = subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{web}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"))
    try:
        received = wait_for_sample(web, "edgecl_samples_received_total", server, tmp_path)
        assert received == 120.0
        api = f"http://127.0.0.1:{web}/api/v1"
        groups = json.loads(get(f"{api}/rules"))["data"]["groups"]
        loaded = {r["name"]: r["health"] for g in groups for r in g["rules"]}
        assert set(alert_names()) <= set(loaded)
        assert not [name for name, health in loaded.items() if health == "err"]
        for query in dashboard_queries():
            reply = json.loads(get(f"{api}/query?query={urllib.parse.quote(query)}"))
            assert reply["status"] == "success", (query, reply)
        assert query_value(web, f'edgecl_snapshot_version{{job="edgecl"}}') == 1.0
        assert query_value(web, 'up{job="edgecl"}') == 1.0
    finally:
        server.terminate()
        server.wait(30)


def query_value(web: int, query: str) -> float | None:
    url = f"http://127.0.0.1:{web}/api/v1/query?query={urllib.parse.quote(query)}"
    result = json.loads(get(url))["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def wait_for_sample(web: int, query: str, server, tmp_path, timeout: float = 60) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
        try:
            value = query_value(web, query)
            if value is not None:
                return value
        except OSError:
            pass  # not listening yet
        time.sleep(0.5)
    raise AssertionError(f"no {query} scraped in {timeout} s: "
                         + (tmp_path / "prometheus.log").read_text()[-2000:])
