"""The lean install for sensors and devices, for real: a virtual environment with a plain
`pip install edgecl` (pip reaches the package registry; the venv is cached under
.pytest_cache by its dependency list, edgecl is reinstalled each run). It has no torch, pushes
to and pulls from a daemon running in this (full) environment, checks the sha256 of what it
pulled and classifies with onnxruntime; commands that need an extra say which, in one line."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import lean_venv
from edgecl.extras import EXTRAS
from edgecl.export.snapshots import FP32_FILE, INT8_FILE, META_FILE
from export_helpers import blob_images
from test_snapshots_e2e import make_config

pytestmark = pytest.mark.timeout(1200)  # a first build downloads onnxruntime and numpy

CLASSIFY = """
import hashlib, json, sys
from pathlib import Path
import numpy as np, onnxruntime as ort
out = Path(sys.argv[1])
meta = json.loads((out / "meta.json").read_text())
digests = {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in meta["files"]}
x = np.load(sys.argv[2])["x"]
session = ort.InferenceSession(str(out / "model.int8.onnx"), providers=["CPUExecutionProvider"])
logits = session.run(None, {meta["input"]["name"]: x})[0]
print(json.dumps({"sha256": digests, "labels": [meta["labels"][i] for i in logits.argmax(1)],
                  "modules": sorted(m for m in ("torch", "torchvision", "onnx") if m in sys.modules)}))
"""


@pytest.fixture(scope="module")
def lean(request, tmp_path_factory) -> Path:
    root = os.environ.get("EDGECL_LEAN_VENV_CACHE")
    if root:
        cache = Path(root)
    elif getattr(request.config, "cache", None) is not None:  # pytest's cache plugin is on
        cache = request.config.cache.mkdir("lean-venv")
    else:
        cache = tmp_path_factory.mktemp("lean-venv")
    return lean_venv.cached(cache)


def run(lean: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only the venv's edgecl
    return subprocess.run([str(lean_venv.bin_path(lean, args[0])), *args[1:]], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd="/")


def test_the_extras_in_pyproject_are_the_ones_edgecl_names():
    extras = lean_venv.tomllib.loads((lean_venv.ROOT / "pyproject.toml").read_text())[
        "project"]["optional-dependencies"]
    assert set(EXTRAS) <= set(extras)
    assert not any(dep.split(">")[0].split("<")[0].strip() in ("torch", "torchvision", "onnx")
                   for dep in lean_venv.dependencies())


def test_the_daemon_deploy_files_install_the_server_extra():
    """A plain install is the client: the daemon's container and unit must ask for more."""
    deploy = lean_venv.ROOT / "deploy"
    assert re.search(r"^RUN pip install \"\.\[server[],]", (deploy / "Containerfile").read_text(),
                     re.M)
    assert "pip install '/path/to/edgecl[server]'" in (deploy / "edgecl.service").read_text()
    makefile = (lean_venv.ROOT / "Makefile").read_text()
    extras = re.search(r"^EXTRAS := (\S+)", makefile, re.M).group(1).split(",")
    assert {"server", "data", "plot", "test"} <= set(extras)


def test_the_lean_install_has_no_torch_and_edgecl_comes_from_it(lean):
    dists = lean_venv.installed_distributions(lean)
    assert {"edgecl", "onnxruntime", "pyzmq", "msgpack", "numpy"} <= dists
    assert not dists & {"torch", "torchvision", "onnx", "mlxtend", "matplotlib",
                        "prometheus-client"}
    where = run(lean, "python", "-c", "import edgecl; print(edgecl.__file__)")
    assert where.returncode == 0 and str(lean) in where.stdout, where.stderr
    assert run(lean, "python", "-c", "import torch").returncode != 0


@pytest.mark.parametrize("argv, extra", [
    (["serve", "--port", "0"], "edgecl[server]"),
    (["demo"], "edgecl[server,data]"),
    (["bench", "split-mnist", "--seeds", "0"], "edgecl[server,data]"),
    (["methods"], "edgecl[server]"),
    (["push", "mnist5k", "--to", "tcp://127.0.0.1:9"], "edgecl[data]"),
    (["report", "/nonexistent-state"], "edgecl[plot]"),
])
def test_commands_that_need_an_extra_say_which_in_one_line(lean, argv, extra):
    done = run(lean, "edgecl", *argv)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgecl: error: "), done.stderr
    assert f"pip install '{extra}'" in lines[0]
    assert "Traceback" not in done.stderr


def test_a_lean_sensor_and_device_against_a_full_daemon(lean, run_daemons, tmp_path):
    daemon = run_daemons(make_config(tmp_path))
    x, y = blob_images(30, seed=0)
    np.savez(tmp_path / "stream.npz", x=x, y=np.array(y))
    pushed = run(lean, "edgecl", "push", str(tmp_path / "stream.npz"), "--to", daemon.address,
                 "--batch", "20", "--sensor", "lean-cam", "--no-progress")
    assert pushed.returncode == 0, pushed.stderr
    assert f"acked {len(y)}" in pushed.stdout

    out = tmp_path / "device"
    pulled = run(lean, "edgecl", "pull", "--from", daemon.address, "--out", str(out),
                 "--wait-ms", "120000", timeout=240)
    assert pulled.returncode == 0, pulled.stderr
    version = json.loads((out / META_FILE).read_text())["version"]
    assert f"installed snapshot {version}" in pulled.stdout

    np.savez(tmp_path / "probe.npz", x=x[:16])
    classified = run(lean, "python", "-c", CLASSIFY, str(out), str(tmp_path / "probe.npz"))
    assert classified.returncode == 0, classified.stderr
    result = json.loads(classified.stdout)
    assert result["modules"] == []  # nothing torch-side was imported on the device
    published = daemon.snapshots.store.meta(version)["files"]
    assert result["sha256"] == {name: published[name]["sha256"] for name in result["sha256"]}
    assert set(result["sha256"]) == {FP32_FILE, INT8_FILE}
    # the same int8 model in this environment gives the same answers
    here = ort.InferenceSession(str(out / INT8_FILE), providers=["CPUExecutionProvider"])
    labels = json.loads((out / META_FILE).read_text())["labels"]
    expected = [labels[i] for i in here.run(None, {"input": x[:16]})[0].argmax(1)]
    assert result["labels"] == expected and set(expected) <= set(y)


def test_the_device_example_runs_in_the_lean_install(lean, run_daemons, tmp_path):
    daemon = run_daemons(make_config(tmp_path))
    x, y = blob_images(30, seed=1)
    from edgecl.client import SensorClient
    with SensorClient(daemon.address, sensor="cam") as client:
        for i in range(0, len(y), 20):
            client.push(x[i:i + 20], y[i:i + 20])
    example = lean_venv.ROOT / "examples" / "device_infer.py"
    done = run(lean, "python", str(example), "--from", daemon.address, "--dir",
               str(tmp_path / "dev"), "--seconds", "2", "--wait-ms", "120000", timeout=240)
    assert done.returncode == 0, done.stderr
    assert "version 1:" in done.stdout and "images" in done.stdout
    assert hashlib.sha256((tmp_path / "dev" / INT8_FILE).read_bytes()).hexdigest() == \
        daemon.snapshots.store.meta(1)["files"][INT8_FILE]["sha256"]
