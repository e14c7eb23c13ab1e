"""Federation on Flower: sites that each see only some digits, before and after the rounds,
beside one central daemon that saw everything.

    .venv/bin/python benchmarks/federation.py [--train-per-class 200] [--rounds 10]
        [--configs 3:disjoint] [--fedavg CONFIGS] [--no-calibration CONFIGS]
        [--write BENCHMARKS.md]

For each configuration (sites : split, edgecl/federation/trial.py):
- before: each site's learner alone on its own stream (in process, the daemon's default
  learner settings), scored on the test digits of all ten classes;
- after 1, 3 and 10 rounds: a real local federation (`edgecl.federation.local`: a SuperLink,
  a SuperNode and an `edgecl serve` daemon per site, TLS, node authentication and CURVE,
  `flwr run`), with the ServerApp's defaults (class-aware aggregation, head calibration).
  Each site's sensor spreads its stream over --push-seconds (set it to about the rounds'
  total time, or the streams run out early); a round waits until every site learned
  1/rounds of its stream (or 60 s passed). After each round's merge every site exports a
  snapshot, which is pulled over the wire and scored with onnxruntime (fp32) on the same
  test digits (a snapshot the parity gate refuses whole is not published: the site's newest
  is then an older one, as for its devices; one whose int8 model alone failed is published
  as fp32 alone, and the newest int8 model, what an int8 device runs, is scored beside it);
- bytes sent per round (the global model to every site, each site's model back, and the
  head calibration's query and class statistics; Flower's ArrayRecord sizes) and round
  time on loopback;
- central: one learner (in process) on every site's samples, interleaved in the order the
  sites' sensors push them.
Configurations listed in --fedavg are also run with plain FedAvg, those in --no-calibration
without head calibration. benchmarks/federation_sim.py runs the same rounds in process, on
more cuts and seeds than this real-network run can afford.
Results go to bench-results/federation/; --write renders the BENCHMARKS.md section.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from sections import write_section  # noqa: E402

OUT = ROOT / "bench-results" / "federation"
BATCH = 32


def learn_alone(x: np.ndarray, y: np.ndarray, test_x, test_y, seed: int) -> float:
    """The daemon's default learner, in process, one pass in pushes of BATCH."""
    from edgecl.learn import OnlineLearner

    learner = OnlineLearner(seed=seed, threads=1)
    for start in range(0, len(y), BATCH):
        learner.learn_many(x[start:start + BATCH], y[start:start + BATCH].tolist())
    predicted = np.asarray(learner.predict_many(test_x))
    return float(np.mean(predicted == test_y))


def run_config(sites: int, split: str, strategy: str, calibration: str, args) -> dict:
    from edgecl.federation.trial import run_trial, site_accuracy, site_streams

    streams, test_x, test_y = site_streams(sites, split, args.seed, args.train_per_class)
    t0 = time.time()
    before = {s.name: learn_alone(s.x, s.y, test_x, test_y, args.seed) for s in streams}
    work = Path(tempfile.mkdtemp(prefix="edgecl-fedbench-"))
    print(f"{sites}:{split} {strategy} {calibration}: alone {before} "
          f"({time.time() - t0:.0f} s); "
          f"federating in {work}", flush=True)
    trial = run_trial(work, sites, split, args.rounds, strategy, args.seed,
                      args.train_per_class, push_seconds=args.push_seconds,
                      calibration=calibration,
                      progress=lambda line: print(line, flush=True))
    rounds = trial.results["rounds"]
    return {"sites": sites, "split": split, "strategy": strategy,
            "calibration": calibration, "seed": args.seed,
            "train_per_class": args.train_per_class, "rounds_run": args.rounds,
            "classes": {s.name: s.classes for s in streams}, "before": before,
            "after": {r: site_accuracy(trial.results, r) for r in range(1, args.rounds + 1)},
            "after_int8": {r: site_accuracy(trial.results, r, "int8-accuracy")
                           for r in range(1, args.rounds + 1)},
            "bytes_down": {r: rounds[str(r)]["bytes_down"] for r in range(1, args.rounds + 1)},
            "bytes_up": {r: rounds[str(r)]["bytes_up"] for r in range(1, args.rounds + 1)},
            "round_s": {r: rounds[str(r)].get("seconds") for r in range(1, args.rounds + 1)},
            "learned": trial.learned, "received": trial.received,
            "snapshots_rejected": trial.rejected, "int8_withheld": trial.int8_withheld,
            "wall_s": time.time() - t0}


def run_central(sites: int, split: str, args) -> dict:
    from edgecl.federation.trial import interleaved, site_streams

    streams, test_x, test_y = site_streams(sites, split, args.seed, args.train_per_class)
    x, y = interleaved(streams, args.rounds)
    return {"accuracy": learn_alone(x, y, test_x, test_y, args.seed), "samples": len(y)}


def mean(values) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def row(result: dict, central: float) -> str:
    after = result["after"]
    cells = [f"{result['sites']}", result["split"], result["strategy"],
             result.get("calibration", "none"),
             f"{mean(result['before'].values()):.1%} (max {max(result['before'].values()):.1%})"]
    for r in (1, 3, 10):
        acc = after.get(str(r), after.get(r))
        cells.append("–" if not acc else
                     f"{mean(acc.values()):.1%} (worst {min(acc.values()):.1%})")
    final = after.get(str(result["rounds_run"]), after.get(result["rounds_run"])) or {}
    cells.append(f"{central:.1%}")
    cells.append(f"{(mean(final.values()) - central) * 100:+.1f}" if final else "–")
    int8 = result.get("after_int8", {})
    int8 = int8.get(str(result["rounds_run"]), int8.get(result["rounds_run"])) or {}
    cells.append(f"{mean(int8.values()):.1%} (worst {min(int8.values()):.1%})" if int8 else "–")
    down = mean(result["bytes_down"].values()) / 1e6
    up = mean(result["bytes_up"].values()) / 1e6
    refused = [result.get("snapshots_rejected"), result.get("int8_withheld")]
    cells += [f"{down:.1f} / {up:.1f}", f"{mean(result['round_s'].values()):.0f}",
              " / ".join("–" if r is None else str(sum(r.values())) for r in refused),
              "yes" if result["learned"] == result["received"] else "NO"]
    return "| " + " | ".join(cells) + " |"


def render(results: list[dict], central: dict, command: str) -> str:
    """`central`: (sites, split) -> the central run on that cut's streams."""
    cpu = platform.processor() or platform.machine()
    lines = [
        "## Federation on Flower: many sites, one model",
        "",
        f"Command: `{command}`. Machine: {os.cpu_count()} cores ({cpu}), no GPU; every "
        "daemon's learner on 1 thread (all cores but one), all sites, the SuperLink and the "
        "SuperNodes on this one box, over loopback with TLS, node authentication and CURVE.",
        f"Split-MNIST on MNIST-5k, {results[0]['train_per_class']} training digits per class, "
        f"seed {results[0]['seed']}; the test set is the same 1,000 digits (100 per class) for "
        "every site. Accuracy is each site's newest snapshot after that round's merge, pulled "
        "over the wire and scored with onnxruntime (fp32), on all ten classes: the mean over "
        "sites and the worst site (a snapshot the gate refused leaves the site's older "
        "one). *Before*: each site's learner alone on its whole stream "
        "(its classes only). *Central*: one learner on every site's samples of that cut, "
        "interleaved as the sensors push them. Δ central: the last round's mean minus "
        "central, in points. *int8 devices, after 10*: the newest version that has an int8 "
        "model, scored as an int8-only device pulls it (`–`: not measured in that run). "
        "Refused: snapshots the parity gate refused whole / published as fp32 alone "
        "because only int8 failed (`–`: the run predates fp32-alone publishing), all sites, "
        "the whole run. MB per round: what the SuperLink sent to all sites (the "
        "global model, twice with calibration: the query carries it) / what came back (the "
        "sites' models and class statistics).",
        "",
        "| sites | split | strategy | calibration | before | after 1 round | after 3 "
        "| after 10 | central | Δ central | int8 devices, after 10 | MB per round (down / up) "
        "| round s | refused (whole / int8) | nothing acked lost |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [row(r, central[(r["sites"], r["split"])]["accuracy"]) for r in results]
    return "\n".join(lines) + "\n"


def parse_configs(text: str) -> list[tuple[int, str]]:
    out = []
    for item in filter(None, text.split(",")):
        sites, _, split = item.partition(":")
        out.append((int(sites), split or "disjoint"))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-per-class", type=int, default=200)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--push-seconds", type=float, default=1500.0,
                   help="each site's sensor spreads its stream over this long (about the "
                   "rounds' total time)")
    p.add_argument("--configs", default="3:disjoint")
    p.add_argument("--fedavg", default="")
    p.add_argument("--no-calibration", default="")
    p.add_argument("--render", action="store_true", help="only render the saved results")
    p.add_argument("--write", metavar="MD", help="write the section into this file")
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    runs = [(s, sp, "class-aware", "features") for s, sp in parse_configs(args.configs)]
    runs += [(s, sp, "fedavg", "features") for s, sp in parse_configs(args.fedavg)]
    runs += [(s, sp, "class-aware", "none") for s, sp in parse_configs(args.no_calibration)]
    tag = f"tpc{args.train_per_class}-r{args.rounds}-s{args.seed}"
    cuts = sorted({(s, sp) for s, sp, *_ in runs})
    if not args.render:
        for sites, split in cuts:
            central = run_central(sites, split, args)
            (OUT / f"central-{sites}{split}-{tag}.json").write_text(json.dumps(central))
            print(f"central {sites}:{split}: {central}", flush=True)
        for sites, split, strategy, calibration in runs:
            result = run_config(sites, split, strategy, calibration, args)
            (OUT / f"{sites}-{split}-{strategy}-{calibration}-{tag}.json").write_text(
                json.dumps(result))
            central = json.loads((OUT / f"central-{sites}{split}-{tag}.json").read_text())
            print(row(result, central["accuracy"]), flush=True)
    central = {(s, sp): json.loads((OUT / f"central-{s}{sp}-{tag}.json").read_text())
               for s, sp in cuts}
    names = [f"{s}-{sp}-{st}-{cal}-{tag}.json" for s, sp, st, cal in runs]
    results = [json.loads((OUT / n).read_text()) for n in names if (OUT / n).exists()]
    text = render(results, central, "benchmarks/federation.py " + " ".join(sys.argv[1:]))
    print(text)
    if args.write:
        write_section(Path(args.write), "federation", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
