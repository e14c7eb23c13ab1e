"""The Flower ServerApp: rounds of "merge the last global model, learn, report" over every
site, aggregated by `SiteAwareFedAvg`.

Run config (the app's pyproject.toml, or `flwr run ... --run-config`):
`num-rounds`, `strategy` (`class-aware` | `fedavg`), `calibration` (`features`: refit the
head on the sites' class statistics each round | `none`), `calibration-rank` (principal
directions per class in those statistics, 0..64), `min-sites`, `local-samples` and
`local-timeout-s` (how long a site learns between rounds), `round-timeout-s`, and
`results-file` (a JSON file the ServerApp writes each round's figures to; empty: none).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from edgecl.federation.aggregate import STRATEGIES
from edgecl.federation.strategy import CALIBRATIONS, SiteAwareFedAvg
from edgecl.wire import DEFAULT_STATS_RANK, MAX_STATS_RANK

log = logging.getLogger("edgecl.federation")

RUN_DEFAULTS = {"num-rounds": 10, "strategy": "class-aware", "calibration": "features",
                "calibration-rank": DEFAULT_STATS_RANK, "min-sites": 2,
                "local-samples": 256, "local-timeout-s": 120.0, "round-timeout-s": 900.0,
                "results-file": ""}

app = ServerApp()


def run_settings(run_config) -> dict:
    """The run config over the defaults, checked (a bad value fails the run at once)."""
    settings = {**RUN_DEFAULTS, **dict(run_config)}
    if settings["strategy"] not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, "
                         f"not {settings['strategy']!r}")
    if settings["calibration"] not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {', '.join(CALIBRATIONS)}, "
                         f"not {settings['calibration']!r}")
    if not 0 <= int(settings["calibration-rank"]) <= MAX_STATS_RANK:
        raise ValueError(f"calibration-rank must be 0..{MAX_STATS_RANK}")
    for key in ("num-rounds", "min-sites"):
        if int(settings[key]) < 1:
            raise ValueError(f"{key} must be >= 1")
    return settings


def write_results(path: str, strategy: SiteAwareFedAvg, settings: dict) -> None:
    if not path:
        return
    out = {"settings": settings, "rounds": {str(k): v for k, v in strategy.rounds.items()},
           "labels": None if strategy.model is None else strategy.model.labels}
    Path(path).write_text(json.dumps(out, indent=1, default=str))


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = run_settings(context.run_config)
    sites = int(settings["min-sites"])
    strategy = SiteAwareFedAvg(aggregation=settings["strategy"],
                               calibration=settings["calibration"],
                               calibration_rank=int(settings["calibration-rank"]),
                               query_timeout=float(settings["round-timeout-s"]),
                               min_available_nodes=sites,
                               min_train_nodes=sites, min_evaluate_nodes=sites)
    site_config = ConfigRecord({"local-samples": int(settings["local-samples"]),
                                "local-timeout-s": float(settings["local-timeout-s"])})
    rounds = int(settings["num-rounds"])

    def after_round(server_round: int, arrays: ArrayRecord):
        if server_round:
            write_results(settings["results-file"], strategy, settings)
        return None

    strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=rounds,
                   timeout=float(settings["round-timeout-s"]), train_config=site_config,
                   evaluate_config=ConfigRecord(), evaluate_fn=after_round)
    write_results(settings["results-file"], strategy, settings)
