"""`--metrics-port`: the same figures as `edgecl status`, for Prometheus.

A custom collector reads `Daemon.status()` at scrape time, so there is one source of truth and
no second set of counters to keep in step. It uses its own registry: several daemons in one
process (tests) do not collide in the global one.
"""
from __future__ import annotations

from datetime import datetime
from typing import Callable

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from edgecl.errors import UserError

# status key -> (metric name, help, is_counter)
SCALARS = {
    "samples_received": ("edgecl_samples_received", "Samples accepted (acked) by the daemon", True),
    "samples_learned": ("edgecl_samples_learned", "Samples the learner has learned", True),
    "samples_offered": ("edgecl_samples_offered",
                        "Samples only offered to the replay buffer (real-time overload)", True),
    "samples_failed": ("edgecl_samples_failed", "Accepted samples the learner failed on", True),
    "samples_duplicate": ("edgecl_samples_duplicate",
                          "Samples in retried pushes recognised as duplicates", True),
    "batches_received": ("edgecl_batches_received", "Pushes accepted", True),
    "steps": ("edgecl_learner_steps", "Optimizer steps taken", True),
    "queue_depth": ("edgecl_queue_depth_samples", "Samples acked but not yet learned", False),
    "queue_bytes": ("edgecl_queue_bytes", "Bytes held by the ingest queue", False),
    "queue_capacity_bytes": ("edgecl_queue_capacity_bytes", "Bound of the ingest queue", False),
    "n_classes": ("edgecl_classes", "Classes seen so far", False),
    "prequential_acc": ("edgecl_prequential_accuracy",
                        "Accuracy of predictions made before learning each sample", False),
    "prequential_acc_window": ("edgecl_prequential_accuracy_window",
                               "Prequential accuracy over the recent window", False),
    "buffer_fill": ("edgecl_buffer_fill", "Samples held in the replay buffer", False),
    "buffer_capacity": ("edgecl_buffer_capacity", "Replay buffer capacity", False),
    "buffer_bytes": ("edgecl_buffer_bytes", "Bytes held by the replay buffer", False),
    "learn_rate": ("edgecl_learn_rate_samples_per_second",
                   "Samples trained per second (moving average)", False),
    "busy_line": ("edgecl_busy_line_sensors", "Sensors refused busy and waiting their turn",
                  False),
    "steps_per_s": ("edgecl_learner_steps_per_second", "Recent learner step rate", False),
    "uptime_s": ("edgecl_uptime_seconds", "Seconds since the daemon started", False),
    "snapshot_version": ("edgecl_snapshot_version", "Newest published snapshot version", False),
    "snapshots_rejected": ("edgecl_snapshots_rejected",
                           "Snapshots the parity gate refused this run", True),
    "snapshots_int8_withheld": ("edgecl_snapshots_int8_withheld",
                                "Snapshots published as fp32 alone this run: their int8 "
                                "model failed the parity gate", True),
    "snapshot_int8_version": ("edgecl_snapshot_int8_version",
                              "Newest published snapshot version that has an int8 model", False),
    "curve_refused": ("edgecl_curve_refused",
                      "CURVE handshakes refused: a client key not on the allow-list", True),
}


class StatusCollector:
    def __init__(self, status: Callable[[], dict]):
        self._status = status

    def collect(self):
        status = self._status()
        for key, (name, help_, counter) in SCALARS.items():
            value = status.get(key)
            if value is None:
                continue
            family = CounterMetricFamily if counter else GaugeMetricFamily
            yield family(name, help_, value=float(value))
        refused = CounterMetricFamily("edgecl_refused", "Requests refused, by error code",
                                      labels=["code"])
        for code, count in sorted(status.get("refused", {}).items()):
            refused.add_metric([code], float(count))
        yield refused
        per_class = GaugeMetricFamily("edgecl_class_accuracy",
                                      "Prequential accuracy per class", labels=["label"])
        for entry in status.get("per_class_acc", []):
            per_class.add_metric([str(entry["label"])], float(entry["acc"]))
        yield per_class
        yield from health_families(status)


def health_families(status: dict):
    """What the alert rules in deploy/prometheus/ watch besides the counters: storage errors
    (1 while the journal or the last checkpoint write is failing) and the time of the last
    snapshot the parity gate rejected (0: none), so `changes()` sees each new rejection."""
    storage = GaugeMetricFamily("edgecl_storage_error",
                                "1 while writes to this part of the state directory fail",
                                labels=["part"])
    for part in ("journal", "checkpoint"):
        storage.add_metric([part], float(bool((status.get(part) or {}).get("error"))))
    yield storage
    failure = status.get("snapshot_last_failure") or {}
    try:
        rejected = datetime.fromisoformat(failure["time"]).timestamp()
    except (KeyError, TypeError, ValueError):
        rejected = 0.0
    yield GaugeMetricFamily("edgecl_snapshot_rejected_last_timestamp_seconds",
                            "When the parity gate last rejected a snapshot (0: never)",
                            value=rejected)


def start_metrics_server(port: int, host: str, status: Callable[[], dict]):
    """Serve /metrics in a background thread; returns the server (call .shutdown())."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(status))
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise UserError(f"cannot serve metrics on {host}:{port}: {exc.strerror}; choose "
                        "another --metrics-port") from None
    return server
