"""`ModelClient`: the federation side of a daemon, for a site's Flower client: read the
site's student (`model.get`), hand it a global model to merge (`model.merge`), and ask for
its classes' embedding statistics under a candidate global model (`model.stats`).

Speaks docs/protocol.md through `Connection` (Lazy Pirate retries, CURVE); errors raise
`RequestRefused` like every other client. numpy, msgpack and pyzmq only: no torch.

    with ModelClient("tcp://edge-box:5555") as client:
        site = client.get_model()                    # SiteModel: labels, counts, arrays...
        client.merge(labels, arrays, merge_id="round-7")
        stats = client.class_stats(labels, arrays)   # ClassStats: labels, counts, mean, var
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import zmq

from edgecl.client.connection import DEFAULT_RETRIES, DEFAULT_TIMEOUT_S, Connection
from edgecl.security import ClientCurve
from edgecl.wire import DEFAULT_STATS_RANK, plain_label

DEFAULT_GET_WAIT_MS = 30_000
DEFAULT_MERGE_WAIT_MS = 60_000


@dataclass
class ClassStats:
    """model.stats' reply: per label in the site's buffer, its sample count, the mean and
    variance of each embedding dimension (arrays of shape (labels, dim)) and its leading
    principal directions scaled by their standard deviations ((labels, rank, dim))."""

    labels: list
    counts: list[int]
    mean: np.ndarray
    var: np.ndarray
    components: np.ndarray | None = None


@dataclass
class SiteModel:
    """The site's student as model.get returned it; `arrays` in state_dict order."""

    labels: list
    counts: list[int]
    samples_learned: int
    learned_since_merge: int
    merges: int
    arch: str
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


class ModelClient:
    """model.get and model.merge against one daemon. Each request waits up to its `wait_ms`
    for the learner, plus `timeout` for the network, and is resent (same request, same
    merge_id) after a timeout, up to `retries` times."""

    def __init__(self, address: str, timeout: float = DEFAULT_TIMEOUT_S,
                 retries: int = DEFAULT_RETRIES, context: zmq.Context | None = None,
                 curve: ClientCurve | None = None):
        self.address = address
        self.timeout = timeout
        self.retries = retries
        self.curve = curve
        self._ctx = context or zmq.Context.instance()

    def _connection(self, wait_ms: int) -> Connection:
        return Connection(self.address, self.timeout + wait_ms / 1000, self.retries,
                          self._ctx, curve=self.curve)

    def get_model(self, wait_ms: int = DEFAULT_GET_WAIT_MS) -> SiteModel:
        """The current student, copied by the learner between two steps."""
        with self._connection(wait_ms) as conn:
            reply = conn.request("model.get", wait_ms=int(wait_ms))
        arrays = {a["name"]: np.frombuffer(a["data"], dtype="<f4").reshape(a["shape"]).copy()
                  for a in reply["arrays"]}
        return SiteModel(labels=list(reply["labels"]), counts=list(reply["counts"]),
                         samples_learned=reply["samples_learned"],
                         learned_since_merge=reply["learned_since_merge"],
                         merges=reply["merges"], arch=reply["arch"], arrays=arrays)

    def class_stats(self, labels: Sequence, arrays: dict[str, np.ndarray],
                    rank: int = DEFAULT_STATS_RANK,
                    wait_ms: int = DEFAULT_GET_WAIT_MS) -> ClassStats:
        """Per-class embedding statistics of the site's replay buffer under the candidate
        global model (`labels`, `arrays` as for merge), with `rank` principal directions per
        class, computed on a copy: nothing is merged. A retry is harmless: the request
        changes nothing."""
        header, payload = _model_frames(labels, arrays)
        with self._connection(wait_ms) as conn:
            reply = conn.request("model.stats", payload, wait_ms=int(wait_ms), rank=int(rank),
                                 **header)
        moments = {a["name"]: np.frombuffer(a["data"], dtype="<f4").reshape(a["shape"]).copy()
                   for a in reply["arrays"]}
        return ClassStats(list(reply["labels"]), list(reply["counts"]), moments["mean"],
                          moments["var"], moments["components"])

    def merge(self, labels: Sequence, arrays: dict[str, np.ndarray],
              counts: Sequence[int] | None = None, merge_id: str | None = None,
              wait_ms: int = DEFAULT_MERGE_WAIT_MS) -> dict:
        """Hand the daemon a global model: `labels` in its head order, `arrays` by name in
        the order model.get gave them. Returns the reply (`merged`, `labels`, `merges`, ...,
        or `queued` when wait_ms is 0 or ran out). A retry is safe: every request carries a
        merge_id (a fresh one if none is given), and a repeat is not applied twice."""
        header, payload = _model_frames(labels, arrays)
        header.update(merge_id=merge_id or uuid.uuid4().hex, wait_ms=int(wait_ms))
        if counts is not None:
            header["counts"] = [int(c) for c in counts]
        with self._connection(wait_ms) as conn:
            reply = conn.request("model.merge", payload, **header)
        return {k: v for k, v in reply.items() if k not in ("v", "ok", "rid")}

    def close(self) -> None:
        """Nothing held between requests: each opens and closes its own socket."""

    def __enter__(self) -> "ModelClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _model_frames(labels: Sequence, arrays: dict[str, np.ndarray]) -> tuple[dict, bytes]:
    """The header fields (labels, array specs) and payload of a model.merge or model.stats."""
    parts = [np.ascontiguousarray(a, dtype="<f4") for a in arrays.values()]
    header = {"labels": [plain_label(v) for v in labels],
              "arrays": [{"name": str(name), "dtype": "float32",
                          "shape": [int(d) for d in part.shape]}
                         for name, part in zip(arrays, parts)]}
    return header, b"".join(part.tobytes() for part in parts)
