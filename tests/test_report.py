"""The daemon's time series (STATE/timeseries.jsonl) and `edgecl report`: a real daemon learns,
publishes, restarts on the same state directory; the report's files are opened and must show
what they claim (each class's line, each snapshot's version and accuracies, the restart)."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from edgecl.cli import main
from edgecl.client import Connection, SensorClient
from edgecl.serve import timeseries
from edgecl.serve.timeseries import FILE, TimeSeries, read
from export_helpers import blob_images
from test_snapshots_e2e import make_config


def push(daemon, x, y) -> None:
    with SensorClient(daemon.address, sensor="cam") as client:
        for i in range(0, len(y), 20):
            client.push(x[i:i + 20], y[i:i + 20])


def wait_version(daemon, since: int) -> int:
    with Connection(daemon.address, timeout=65, retries=0) as conn:
        return conn.request("snapshot.info", since=since, wait_ms=60_000)["version"]


@pytest.fixture
def story_dir(tmp_path, run_daemons, monkeypatch):
    """A state directory after two daemon runs: 120 samples and snapshot 1, a restart, 120
    more samples and snapshot 2."""
    monkeypatch.setattr(timeseries, "POINT_INTERVAL_S", 0.05)
    config = make_config(tmp_path)
    x, y = blob_images(30, seed=0)
    first = run_daemons(config)
    push(first, x, y)
    assert wait_version(first, 0) == 1
    first.stop()
    assert first.join(60) == 0
    second = run_daemons(make_config(tmp_path))
    x2, y2 = blob_images(30, seed=1)
    push(second, x2, y2)
    assert wait_version(second, 1) == 2
    second.stop()
    assert second.join(60) == 0
    return tmp_path / "state", second


def test_the_time_series_survives_a_restart(story_dir):
    state, daemon = story_dir
    records = read(state / FILE)
    kinds = [r["k"] for r in records]
    assert kinds.count("start") == 2
    classes = [r["label"] for r in records if r["k"] == "class"]
    assert sorted(classes) == [f"class-{k}" for k in range(4)]  # once each, across restarts
    points = [r for r in records if r["k"] == "point"]
    assert points[-1]["n"] == daemon.samples_learned and points[-1]["r"] == 240
    assert all(p["lr"] == pytest.approx(0.05) for p in points if p["n"] > 0)
    assert all(0 <= p["acc"] <= 1 for p in points if p["acc"] is not None)
    snapshots = {r["v"]: r for r in records if r["k"] == "snapshot"}
    assert sorted(snapshots) == [1, 2]
    for version, record in snapshots.items():
        held = daemon.snapshots.store.meta(version)["heldout"]
        assert (record["fp32"], record["int8"]) == (held["accuracy_fp32"], held["accuracy_int8"])


def test_the_report_html_shows_the_story(story_dir, tmp_path, capsys):
    state, daemon = story_dir
    out = tmp_path / "report.html"
    assert main(["report", str(state), "--out", str(out)]) == 0
    page = out.read_text()
    for figure in ("accuracy", "snapshots", "queue-lr"):
        assert f"<figure id='{figure}'><svg" in page
    ids = set(re.findall(r'<g id="([^"]+)"', page))
    assert {"acc-overall", "acc-window", "queue-depth", "learning-rate", "restart",
            "snapshot-fp32", "snapshot-int8", "snapshot-v1", "snapshot-v2"} <= ids
    for k in range(4):
        assert {f"acc-class-class-{k}", f"class-class-{k}"} <= ids
    assert "When each class appeared" in page and "Prequential accuracy over the stream" in page
    table = page[page.index("<table id='snapshots'>"):page.index("</table>")]
    for version in (1, 2):
        held = daemon.snapshots.store.meta(version)["heldout"]
        row = (f"<tr><td>v{version}</td><td>{daemon.snapshots.store.meta(version)['samples_learned']}"
               f"</td><td>{100 * held['accuracy_fp32']:.1f}%</td>"
               f"<td>{100 * held['accuracy_int8']:.1f}%</td></tr>")
        assert row in table
    assert "2 start(s)" in page


def test_the_report_as_png_files(story_dir, tmp_path):
    state, _ = story_dir
    out = tmp_path / "figures"
    assert main(["report", str(state), "--out", str(out)]) == 0
    import matplotlib.colors as mcolors
    for name, size in (("accuracy", (990, 715)), ("snapshots", (990, 440)),
                       ("queue-lr", (990, 550))):
        image = np.asarray(Image.open(out / f"{name}.png").convert("RGB"))
        assert image.shape[1::-1] == size
        assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50  # drawn, not blank
    accuracy = np.asarray(Image.open(out / "accuracy.png").convert("RGB")).reshape(-1, 3)
    for k in range(4):  # each class's bar in its tab10 colour
        rgb = np.round(255 * np.array(mcolors.to_rgb(f"C{k}"))).astype(int)
        assert (np.abs(accuracy.astype(int) - rgb).sum(axis=1) <= 3).sum() > 100


def test_report_errors_are_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no such state directory" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "no time series yet" in capsys.readouterr().err


def test_the_series_is_bounded_and_keeps_the_whole_stream(tmp_path):
    series = TimeSeries(tmp_path / FILE, max_points=8, max_events=3)
    series.append({"k": "class", "label": "a", "n": 0, "t": 0})
    for i in range(1, 41):
        series.append({"k": "point", "t": i, "n": 10 * i, "acc": 0.5, "pc": {"a": 0.5}})
        series.append({"k": "snapshot", "v": i, "n": 10 * i, "t": i})
    on_file = read(tmp_path / FILE)
    assert on_file == series.records
    points = [r for r in on_file if r["k"] == "point"]
    assert len(points) < 8 and points[-1]["n"] == 400 and points[0]["n"] <= 80
    assert [r for r in on_file if r["k"] == "class"] == [{"k": "class", "label": "a", "n": 0,
                                                         "t": 0}]
    assert len([r for r in on_file if r["k"] == "snapshot"]) <= 2 * 3
    (tmp_path / FILE).open("a").write('{"k":"point","t":41,"n"')  # a torn line after a crash
    assert read(tmp_path / FILE) == on_file


def test_a_point_costs_what_the_docs_say():
    fixed, per_class = timeseries.BYTES_PER_POINT
    status = {"samples_received": 123456, "queue_depth": 1234, "prequential_acc": 0.876543,
              "prequential_acc_window": 0.912345,
              "per_class_acc": [{"label": k, "acc": 0.8765432} for k in range(10)]}
    line = json.dumps(timeseries.point(status, 120000, 0.05), separators=(",", ":"))
    assert len(line) + 1 <= fixed + 10 * per_class


def test_bench_plot_draws_the_matrices_and_the_stream(monkeypatch, tmp_path, capsys):
    import edgecl.bench as bench
    from edgecl.bench import run_split_mnist, summarize
    from test_bench import tiny_split_mnist

    tiny_split_mnist(monkeypatch)
    monkeypatch.setattr(bench, "baseline_rss_mb", lambda: 0.0)
    monkeypatch.setattr(bench, "run_many", lambda method, buffer, seeds, teacher, **kw:
                        summarize([run_split_mnist(method, buffer, s, teacher) for s in seeds]))
    out = tmp_path / "plots"
    assert main(["bench", "split-mnist", "--method", "finetune,er", "--buffer", "20",
                 "--seeds", "0,1", "--quiet", "--plot", str(out),
                 "--json", str(tmp_path / "r.json")]) == 0
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    svg = (out / "split-mnist-acc-matrix.svg").read_text()
    for result in results:
        name = f"{result['method']} (buffer 20)"
        assert name in svg
        mean = np.mean([r["acc_matrix"] for r in result["runs"]], axis=0)
        assert f'<g id="matrix-{name}">' in svg
        # every cell's value is written in it
        group = svg[svg.index(f'<g id="matrix-{name}">'):].split('<g id="matrix-')[1]
        cells = dict(((int(i), int(j)), v) for i, j, v in re.findall(
            r'<g id="cell-(\d+)-(\d+)">\s*<text[^>]*>([^<]+)</text>', group))
        assert cells == {(i, j): f"{mean[i, j]:.0f}" for i, j in np.ndindex(*mean.shape)}
    stream = (out / "split-mnist-stream.svg").read_text()
    for result in results:
        assert f'<g id="stream-{result["method"]} (buffer 20)">' in stream
    assert "accuracy over the stream" in stream
    for name in ("split-mnist-acc-matrix", "split-mnist-stream"):
        image = np.asarray(Image.open(out / f"{name}.png").convert("RGB"))
        assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50
