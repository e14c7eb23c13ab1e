"""What crosses the Flower network, as Flower records, and back.

Server -> site (train and evaluate messages): `arrays` (the global model; empty before the
first aggregation) and `config` with `labels` (JSON: ints and strings stay apart), `counts`,
`merge-id` (one per aggregation: a site merges each global model once) and the round's
settings. Site -> server (train replies): `arrays` (the site's student), `metrics`
(`num-examples`: samples learned since the last merge, the backbone weight) and `site`
(`labels`, `counts`, `arch`, `name`).
Server -> site (query messages, the head calibration): the round's aggregated model, as in a
train message, and `config` `rank`. Site -> server (query replies): `stats` (`mean`, `var`
and `components`, one entry per label of the site's buffer: its embeddings' moments and
principal directions under that model) and `site` (`labels`, `counts`, `name`).
"""
from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from edgecl.client.federation import ClassStats
from edgecl.federation.aggregate import GlobalModel, SiteModel


def arrays_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()})


def record_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: record[name].numpy() for name in record.keys()}


def encode_labels(labels: list) -> str:
    return json.dumps(list(labels))


def decode_labels(text: str) -> list:
    labels = json.loads(text)
    if not isinstance(labels, list) or not all(
            isinstance(v, (int, str)) and not isinstance(v, bool) for v in labels):
        raise ValueError("labels must be a JSON list of ints and strings")
    return labels


def global_content(model: GlobalModel | None, config: ConfigRecord) -> RecordDict:
    """A train or evaluate message's content: the global model (if any) and the config."""
    config = ConfigRecord(dict(config))
    if model is None:
        return RecordDict({"arrays": ArrayRecord(), "config": config})
    config["labels"] = encode_labels(model.labels)
    config["counts"] = [int(c) for c in model.counts]
    return RecordDict({"arrays": arrays_record(model.arrays), "config": config})


def content_global(content: RecordDict) -> GlobalModel | None:
    """The global model a site was sent, or None before the first aggregation."""
    arrays = content["arrays"]
    if len(arrays) == 0:
        return None
    config = content["config"]
    return GlobalModel(decode_labels(config["labels"]), list(config["counts"]),
                       record_arrays(arrays))


def site_content(model: SiteModel, samples_learned: int) -> RecordDict:
    """A train reply: the site's student and what it learned."""
    return RecordDict({
        "arrays": arrays_record(model.arrays),
        "metrics": MetricRecord({"num-examples": int(model.learned_since_merge),
                                 "samples-learned": int(samples_learned)}),
        "site": ConfigRecord({"labels": encode_labels(model.labels),
                              "counts": [int(c) for c in model.counts],
                              "arch": model.arch, "name": model.name}),
    })


def content_site(content: RecordDict) -> SiteModel:
    site = content["site"]
    return SiteModel(decode_labels(site["labels"]), list(site["counts"]),
                     int(content["metrics"]["num-examples"]), record_arrays(content["arrays"]),
                     arch=str(site["arch"]), name=str(site["name"]))


def stats_content(stats: ClassStats, name: str) -> RecordDict:
    """A query reply: the site's per-class embedding statistics."""
    return RecordDict({
        "stats": arrays_record({"mean": stats.mean, "var": stats.var,
                                "components": stats.components}),
        "site": ConfigRecord({"labels": encode_labels(stats.labels),
                              "counts": [int(c) for c in stats.counts], "name": name}),
    })


def content_stats(content: RecordDict) -> ClassStats:
    site, moments = content["site"], record_arrays(content["stats"])
    labels, counts = decode_labels(site["labels"]), [int(c) for c in site["counts"]]
    mean, var, comps = moments["mean"], moments["var"], moments["components"]
    if not (len(labels) == len(counts) == len(mean) == len(var) == len(comps)) \
            or mean.shape != var.shape or comps.shape[::2] != mean.shape:
        raise ValueError("stats: labels, counts, mean, var and components disagree")
    return ClassStats(labels, counts, mean, var, comps)
