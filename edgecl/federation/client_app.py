"""The Flower ClientApp: a client of its site's daemon over the wire protocol.

It never touches the learner: it asks the daemon for its student (`model.get`) and hands it
the global model (`model.merge`); the daemon merges between two learning steps.

- train: merge the global model the message carries (none in the first round), let the
  daemon learn `local-samples` more samples (at most `local-timeout-s`), then reply with
  the site's student.
- query: the per-class embedding statistics of the daemon's replay buffer under the
  message's model (`model.stats`: computed on a copy, nothing merged), for the server's
  head calibration.
- evaluate: merge the round's global model, so every site holds it between rounds. With
  `eval-npz` in the node config, ask the daemon for a fresh snapshot, pull it like a device
  and score it with onnxruntime on that file's `x`, `y`.

Node config (`flower-supernode --node-config`): `daemon` (tcp://HOST:PORT, required), `name`
(the site's name in results; default the address), `curve-server-key` and `curve-key` (the
daemon's public key file and this client's key pair, for a CURVE daemon), `eval-npz`,
`timeout-s` (per request, default 60).
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from edgecl.client import ModelClient
from edgecl.client.connection import get_status
from edgecl.client.device import DeviceClient, pull_and_score, score_installed
from edgecl.federation.aggregate import SiteModel
from edgecl.federation.records import content_global, site_content, stats_content
from edgecl.security import client_curve
from edgecl.wire import DEFAULT_STATS_RANK

POLL_S = 0.5

app = ClientApp()


@dataclass
class Site:
    address: str
    name: str
    curve: object
    timeout: float
    eval_npz: str

    @classmethod
    def from_context(cls, context: Context) -> "Site":
        cfg = dict(context.node_config)
        if not cfg.get("daemon"):
            raise ValueError("node config needs daemon='tcp://HOST:PORT' (the site's daemon)")
        curve = client_curve(cfg.get("curve-server-key") or None, cfg.get("curve-key") or None)
        return cls(str(cfg["daemon"]), str(cfg.get("name") or cfg["daemon"]), curve,
                   float(cfg.get("timeout-s", 60.0)), str(cfg.get("eval-npz") or ""))

    def client(self) -> ModelClient:
        return ModelClient(self.address, timeout=self.timeout, retries=2, curve=self.curve)


def merge_global(site: Site, msg: Message) -> bool:
    """Hand the message's global model to the daemon; False if it carries none."""
    model = content_global(msg.content)
    if model is None:
        return False
    merge_id = str(msg.content["config"].get("merge-id", ""))
    with site.client() as client:
        client.merge(model.labels, model.arrays, counts=model.counts,
                     merge_id=merge_id or None, wait_ms=int(site.timeout * 1000))
    return True


def learn_between_rounds(site: Site, config: ConfigRecord) -> None:
    """Wait while the daemon learns `local-samples` more samples from its stream, up to
    `local-timeout-s` (a site whose sensors are quiet replies after the timeout)."""
    wanted = int(config.get("local-samples", 0))
    deadline = time.monotonic() + float(config.get("local-timeout-s", 0.0))
    start = get_status(site.address, site.timeout, curve=site.curve)["samples_learned"]
    while wanted > 0 and time.monotonic() < deadline:
        status = get_status(site.address, site.timeout, curve=site.curve)
        if status["samples_learned"] - start >= wanted:
            return
        time.sleep(POLL_S)


def site_name(site: Site) -> ConfigRecord:
    return ConfigRecord({"name": site.name})


@app.train()
def train(msg: Message, context: Context) -> Message:
    site = Site.from_context(context)
    merge_global(site, msg)
    learn_between_rounds(site, msg.content["config"])
    with site.client() as client:
        got = client.get_model(wait_ms=int(site.timeout * 1000))
    model = SiteModel(list(got.labels), list(got.counts), int(got.learned_since_merge),
                      dict(got.arrays), arch=got.arch, name=site.name)
    return Message(site_content(model, got.samples_learned), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    site = Site.from_context(context)
    model = content_global(msg.content)
    if model is None:
        raise ValueError("a stats query carries the round's global model; this one has none")
    with site.client() as client:
        stats = client.class_stats(model.labels, model.arrays,
                                   rank=int(msg.content["config"].get("rank", DEFAULT_STATS_RANK)),
                                   wait_ms=int(site.timeout * 1000))
    return Message(stats_content(stats, site.name), reply_to=msg)


def score_snapshot(site: Site) -> dict:
    """Accuracy of the site's newest snapshot on `eval-npz`, pulled as a device would; and of
    the newest int8 model, which is what an int8 device runs when the newest version holds
    fp32 alone (its int8 model failed the parity gate)."""
    with np.load(site.eval_npz) as data:
        x, y = data["x"], data["y"]
    with tempfile.TemporaryDirectory(prefix="edgecl-eval-") as out:
        scores = pull_and_score(site.address, out, x, y, wait_s=site.timeout, curve=site.curve)
    if scores is None:
        return {}
    metrics = {"accuracy": scores["model.onnx"]["accuracy"],
               "snapshot": int(scores["version"]), "classes": len(scores["labels"]),
               "num-examples": int(len(y))}
    int8, int8_version = scores["model.int8.onnx"], scores["version"]
    if int8 is None:
        with tempfile.TemporaryDirectory(prefix="edgecl-eval-int8-") as out:
            device = DeviceClient(site.address, out, int8_only=True, curve=site.curve)
            if device.pull() is not None:
                int8_scores = score_installed(out, x, y)
                int8, int8_version = int8_scores["model.int8.onnx"], int8_scores["version"]
    if int8 is not None:
        metrics.update({"int8-accuracy": int8["accuracy"], "int8-snapshot": int(int8_version)})
    return metrics


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    site = Site.from_context(context)
    merged = merge_global(site, msg)
    metrics = {"num-examples": 1, "merged": int(merged)}
    if site.eval_npz:
        metrics.update(score_snapshot(site))
    return Message(RecordDict({"metrics": MetricRecord(metrics), "site": site_name(site)}),
                   reply_to=msg)
