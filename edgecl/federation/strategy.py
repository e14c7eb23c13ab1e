"""The ServerApp's strategy: Flower's FedAvg round loop, with edgecl's aggregation.

FedAvg's `start` runs the rounds (sample nodes, send, wait, aggregate). This subclass changes
what travels and how it is combined:

- train and evaluate messages carry the global model's labels and counts and a `merge-id`
  beside its arrays (records.py);
- `aggregate_train` aligns the sites' heads by label and combines them with
  `aggregate.aggregate` (`class-aware` by default, or plain `fedavg` for comparison); then,
  with `calibration="features"` (the default), it sends the aggregated model to the same
  sites as a query, and refits the head on the per-class embedding statistics they reply
  (calibrate.py) before the model goes out;
- every round's figures (per-site metrics, bytes each way, round time) are kept in
  `rounds`, for the ServerApp to write out.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from edgecl.federation.aggregate import GlobalModel, aggregate
from edgecl.federation.calibrate import calibrate_head
from edgecl.federation.records import (arrays_record, content_site, content_stats,
                                       global_content)
from edgecl.wire import DEFAULT_STATS_RANK

CALIBRATIONS = ("features", "none")

log = logging.getLogger("edgecl.federation")


class SiteAwareFedAvg(FedAvg):
    """FedAvg whose aggregation knows that each site's head has its own classes."""

    def __init__(self, aggregation: str = "class-aware", calibration: str = "features",
                 calibration_rank: int = DEFAULT_STATS_RANK, query_timeout: float = 600.0, **kwargs):
        super().__init__(**kwargs)
        if calibration not in CALIBRATIONS:
            raise ValueError(f"calibration must be one of {', '.join(CALIBRATIONS)}, "
                             f"not {calibration!r}")
        self.aggregation = aggregation
        self.calibration = calibration
        self.calibration_rank = calibration_rank
        self.query_timeout = query_timeout
        self._grid: Grid | None = None
        self.model: GlobalModel | None = None
        self.run_tag = str(int(time.time() * 1000))
        self.rounds: dict[int, dict] = {}
        self._aggregations = 0
        self._round_start = time.monotonic()

    def _messages(self, server_round: int, config: ConfigRecord, grid: Grid,
                  message_type: str, fraction: float, minimum: int) -> list[Message]:
        if fraction == 0.0:
            return []
        from flwr.serverapp.strategy.strategy_utils import sample_nodes

        wanted = max(int(len(list(grid.get_node_ids())) * fraction), minimum)
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, wanted)
        config = ConfigRecord(dict(config))
        config["server-round"] = server_round
        if self.model is not None:
            config["merge-id"] = f"{self.run_tag}-{self._aggregations}"
        content = global_content(self.model, config)
        sent = content["arrays"].count_bytes() * len(node_ids)
        self._round(server_round)["bytes_down"] += sent
        return [Message(content=content, message_type=message_type, dst_node_id=node)
                for node in node_ids]

    def _round(self, server_round: int) -> dict:
        return self.rounds.setdefault(server_round, {"bytes_down": 0, "bytes_up": 0,
                                                     "sites": {}})

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._round_start = time.monotonic()
        self._grid = grid
        return self._messages(server_round, config, grid, MessageType.TRAIN,
                              self.fraction_train, self.min_train_nodes)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self._messages(server_round, config, grid, MessageType.EVALUATE,
                              self.fraction_evaluate, self.min_evaluate_nodes)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(list(replies), is_train=True, validate=False)
        sites = []
        for msg in valid:
            try:
                sites.append(content_site(msg.content))
            except (KeyError, ValueError, TypeError) as exc:
                log.warning("round %d: dropped node %d's reply: %s", server_round,
                            msg.metadata.src_node_id, exc)
        if not sites:
            return None, None
        stats = self._round(server_round)
        stats["bytes_up"] += sum(m.content["arrays"].count_bytes() for m in valid)
        self.model = aggregate(sites, self.aggregation)
        if self.calibration == "features" and self._grid is not None:
            self._calibrate(server_round, [m.metadata.src_node_id for m in valid])
        self._aggregations += 1
        stats["labels"] = list(self.model.labels)
        for site in sites:
            stats["sites"].setdefault(site.name, {}).update(
                learned_since_merge=site.learned_since_merge, classes=len(site.labels))
        metrics = MetricRecord({"sites": len(sites),
                                "num-examples": sum(s.learned_since_merge for s in sites)})
        return arrays_record(self.model.arrays), metrics

    def _calibrate(self, server_round: int, node_ids: list[int]) -> None:
        """Ask the sites for their classes' embedding statistics under the aggregated model
        and refit its head on them. A site that does not answer is left out (logged)."""
        started = time.monotonic()
        content = global_content(self.model, ConfigRecord({"server-round": server_round,
                                                           "rank": self.calibration_rank}))
        messages = [Message(content=content, message_type=MessageType.QUERY, dst_node_id=node)
                    for node in node_ids]
        replies = list(self._grid.send_and_receive(messages, timeout=self.query_timeout))
        reports, stats = [], self._round(server_round)
        stats["bytes_down"] += content["arrays"].count_bytes() * len(node_ids)
        for msg in replies:
            if msg.has_error():
                log.warning("round %d: node %d sent no class statistics: %s", server_round,
                            msg.metadata.src_node_id, msg.error.reason)
                continue
            try:
                reports.append(content_stats(msg.content))
                stats["bytes_up"] += msg.content["stats"].count_bytes()
            except (KeyError, ValueError, TypeError) as exc:
                log.warning("round %d: dropped node %d's class statistics: %s", server_round,
                            msg.metadata.src_node_id, exc)
        arrays = self.model.arrays
        arrays["head.weight"], arrays["head.bias"], fitted = calibrate_head(
            self.model.labels, arrays["head.weight"], arrays["head.bias"], reports)
        stats["calibrated"] = {"labels": len(fitted), "sites": len(reports),
                               "seconds": time.monotonic() - started}

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        valid, _ = self._check_and_log_replies(list(replies), is_train=False, validate=False)
        stats = self._round(server_round)
        stats["seconds"] = time.monotonic() - self._round_start
        for msg in valid:
            site = msg.content.get("site")
            name = str(site["name"]) if site is not None else str(msg.metadata.src_node_id)
            stats["sites"].setdefault(name, {}).update(dict(msg.content["metrics"]))
        accuracies = [m.content["metrics"]["accuracy"] for m in valid
                      if "accuracy" in m.content["metrics"]]
        if not accuracies:
            return None
        return MetricRecord({"accuracy": sum(accuracies) / len(accuracies),
                             "sites": len(accuracies)})
