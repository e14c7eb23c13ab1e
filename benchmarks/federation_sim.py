"""The federation in process, on several seeds: aggregation, head calibration, BatchNorm and
merge settings compared on many class cuts, beside each site alone and one central learner.

    .venv/bin/python benchmarks/federation_sim.py [--seeds 0,1,2] [--rounds 10] [--jobs 2]
        [--grid default,keep,replace,fedavg,nocal,bn,alone,central] [--render]
        [--write BENCHMARKS.md]

No network: the sites are `OnlineLearner`s with the daemon's defaults on one thread each, and
every step is the code a federation runs. Each round every site learns the next 1/rounds of
its stream (edgecl/federation/trial.py: Split-MNIST on MNIST-5k, 200 training digits per
class; the seed draws which digits go to which site, their order, and the samples) in pushes
of 32; the sites' students are aggregated (edgecl/federation/aggregate.py); with head
calibration every site reports its class statistics under the aggregated model
(`OnlineLearner.class_statistics`, what `model.stats` answers) and the head is refitted
(edgecl/federation/calibrate.py); then every site merges the result
(`OnlineLearner.merge_global`, what `model.merge` runs). Scored after each round's merge on
the 1,000 test digits of all ten classes (eval mode, as exported): the mean over sites and
the worst site. Alone: each site's learner on its whole stream, no federation. Central: one
learner on every site's samples, interleaved round by round as the sites' sensors push them.
benchmarks/federation.py runs the same on Flower, over loopback, for bytes and round time.
Grids: `default` (edgecl's defaults), `meanvar` (BatchNorm variances averaged, not pooled
over the union), `before` (also DER++'s stored logits kept as they are at a merge: the
defaults before both; `before-fedavg`, `before-nocal`, `before-bn` with them), `fedavg`,
`nocal` (no head calibration), `bn` (BatchNorm statistics at a merge), `replace`, `iter8`
(8 steps per batch on 5 sites).
Results go to bench-results/federation/sim-*.json.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from sections import write_section  # noqa: E402

OUT = ROOT / "bench-results" / "federation"
BATCH = 32
CONFIGS = ((3, "disjoint"), (3, "overlap"), (5, "disjoint"), (5, "overlap"))
DEFAULT = {"strategy": "class-aware", "calibration": "features", "head_fit": "scaled",
           "bn": "global", "bn_variance": "union",
           "learner": {"merge_logits": "fill"}}  # learner: LearnerConfig fields
SHORT = {"head_fit": "short"}  # the head calibration's short fit, the default until now
BEFORE = {**SHORT, "bn_variance": "mean", "learner": {"merge_logits": "keep"}}  # before both
GRIDS = {  # name -> settings that differ from DEFAULT, and on which configurations
    "default": ({}, CONFIGS),
    "fedavg": ({"strategy": "fedavg"}, CONFIGS),
    "nocal": ({"calibration": "none"}, CONFIGS[:1]),
    "short": (SHORT, CONFIGS),
    "short-fedavg": ({**SHORT, "strategy": "fedavg"}, CONFIGS),
    "short-bn": ([{**SHORT, "bn": "local"}, {**SHORT, "bn": "refresh"}], CONFIGS[:1]),
    "meanvar": ({**SHORT, "bn_variance": "mean"}, CONFIGS),
    "before": (BEFORE, CONFIGS),
    "before-fedavg": ({**BEFORE, "strategy": "fedavg"}, CONFIGS),
    "before-nocal": ({**BEFORE, "calibration": "none"}, CONFIGS[:1]),
    "before-bn": ([{**BEFORE, "bn": "local"}, {**BEFORE, "bn": "refresh"}], CONFIGS[:1]),
    "replace": ({**SHORT, "bn_variance": "mean", "learner": {"merge_logits": "replace"}},
                CONFIGS[:1]),
    "iter8": ({**SHORT, "bn_variance": "mean",
               "learner": {"merge_logits": "fill", "iterations": 8}}, CONFIGS[2:3]),
}


def learn(learner, x, y) -> None:
    for start in range(0, len(y), BATCH):
        learner.learn_many(x[start:start + BATCH], y[start:start + BATCH].tolist())


def accuracy(learner, x, y) -> float:
    return float(np.mean(np.asarray(learner.predict_many(x)) == y))


def calibrated(glob, learners, bn: str, fit: str):
    """The aggregated model with its head refitted on the sites' class statistics."""
    from edgecl.client.federation import ClassStats
    from edgecl.federation.calibrate import calibrate_head

    reports = [ClassStats(**learner.class_statistics(glob.arrays, bn=bn)) for learner in learners]
    arrays = glob.arrays
    arrays["head.weight"], arrays["head.bias"], _ = calibrate_head(
        glob.labels, arrays["head.weight"], arrays["head.bias"], reports, fit=fit)
    return glob


def simulate(job: dict, probe=None) -> dict:
    """One federation run: the sites' accuracies after every round. `probe(round, phase,
    streams, learners)` is called before ("local") and after ("merged") each round's merge."""
    import torch

    from edgecl.federation.aggregate import SiteModel, aggregate
    from edgecl.federation.trial import site_streams
    from edgecl.learn import OnlineLearner

    torch.set_num_threads(1)
    streams, tx, ty = site_streams(job["sites"], job["split"], job["seed"], job["tpc"])
    learners = [OnlineLearner(seed=job["seed"], threads=1, **job["learner"])
                for _ in streams]
    per_round = []
    for r in range(job["rounds"]):
        models = []
        for s, learner in zip(streams, learners):
            part = np.array_split(np.arange(len(s.y)), job["rounds"])[r]
            learn(learner, s.x[part], s.y[part])
            models.append(SiteModel(list(learner.labels), list(learner.class_counts),
                                    learner.learned_since_merge, dict(learner.model_arrays()),
                                    name=s.name))
        if probe:
            probe(r + 1, "local", streams, learners)
        glob = aggregate(models, job["strategy"], job["bn_variance"])
        if job["calibration"] == "features":
            glob = calibrated(glob, learners, job["bn"], job["head_fit"])
        for learner in learners:
            learner.merge_global(glob.labels, glob.arrays, job["bn"])
        if probe:
            probe(r + 1, "merged", streams, learners)
        per_round.append([accuracy(learner, tx, ty) for learner in learners])
        print(f"{result_name(job)} round {r + 1}: mean {np.mean(per_round[-1]):.3f}", flush=True)
    return {**job, "accuracy": per_round}


def alone(job: dict) -> dict:
    """Each site's learner on its whole stream, no federation."""
    import torch

    from edgecl.federation.trial import site_streams
    from edgecl.learn import OnlineLearner

    torch.set_num_threads(1)
    streams, tx, ty = site_streams(job["sites"], job["split"], job["seed"], job["tpc"])
    out = []
    for s in streams:
        learner = OnlineLearner(seed=job["seed"], threads=1)
        learn(learner, s.x, s.y)
        out.append(accuracy(learner, tx, ty))
    return {**job, "accuracy": out}


def central(job: dict) -> dict:
    """One learner on every site's samples, interleaved as the sensors push them."""
    import torch

    from edgecl.federation.trial import interleaved, site_streams
    from edgecl.learn import OnlineLearner

    torch.set_num_threads(1)
    streams, tx, ty = site_streams(job["sites"], job["split"], job["seed"], job["tpc"])
    x, y = interleaved(streams, job["rounds"])
    learner = OnlineLearner(seed=job["seed"], threads=1)
    learn(learner, x, y)
    return {**job, "accuracy": accuracy(learner, tx, ty)}


def run_job(job: dict) -> dict:
    return {"sim": simulate, "alone": alone, "central": central}[job["kind"]](job)


def result_name(job: dict) -> str:
    if job["kind"] != "sim":
        return f"sim-{job['kind']}-{job['sites']}{job['split']}-s{job['seed']}.json"
    learner = "".join(f"-{k}={v}" for k, v in sorted(job["learner"].items()))
    var = "" if job["bn_variance"] == "union" else f"-{job['bn_variance']}var"
    fit = "" if job["head_fit"] == "scaled" or job["calibration"] == "none" else \
        f"-{job['head_fit']}fit"  # without calibration there is no fit
    return (f"sim-{job['sites']}{job['split']}-{job['strategy']}-{job['calibration']}{fit}-"
            f"{job['bn']}{var}{learner}-s{job['seed']}.json")


def make_jobs(grids: list[str], seeds: list[int], rounds: int, tpc: int) -> list[dict]:
    base = {"rounds": rounds, "tpc": tpc}
    jobs = []
    for name in grids:
        if name in ("alone", "central"):
            jobs += [{**base, "kind": name, "sites": n, "split": sp, "seed": s}
                     for s in seeds for n, sp in CONFIGS]
            continue
        changes, configs = GRIDS[name]
        for change in (changes if isinstance(changes, list) else [changes]):
            jobs += [{**base, "kind": "sim", **DEFAULT, **change, "sites": n, "split": sp,
                      "seed": s} for s in seeds for n, sp in configs]
    return jobs


def row_key(result: dict) -> tuple:
    return (result["sites"], result["split"], result["strategy"], result["calibration"],
            result["head_fit"] if result["calibration"] != "none" else "–", result["bn"], result["bn_variance"],
            " ".join(f"{k}={v}" for k, v in sorted(result["learner"].items())))


def cell(values: list[float]) -> str:
    return f"{np.mean(values):.1%} ({min(values):.1%})" if values else "–"


def render(results: list[dict], command: str) -> str:
    sims = [r for r in results if r["kind"] == "sim"]
    central_by_run = {(r["sites"], r["split"], r["seed"]): r["accuracy"] for r in results
                      if r["kind"] == "central"}
    alone_seeds = sorted({r["seed"] for r in results if r["kind"] == "alone"})
    seeds = sorted({r["seed"] for r in results})
    lines = ["## Federation in process: many cuts", "",
             f"Command: `{command}`. Machine: {os.cpu_count()} cores "
             f"({platform.processor() or platform.machine()}), no GPU, one learner thread "
             "per site, one or two runs at a time. Seeds "
             f"{', '.join(map(str, seeds))} (a row says how many it ran): each draws which "
             "digits go to which site, their order and the samples. Mean accuracy of the sites on all ten digits after that "
             "round's merge, mean over seeds (in brackets: the worst site of any seed). head "
             "fit: the calibrated head is the converged fit `scaled` to a short fit's row "
             "norm, or the `short` fit itself (edgecl/federation/calibrate.py). bn "
             "variance: a merged BatchNorm variance pooled over the `union` of the sites' "
             "inputs, or their `mean`. learner: the sites' LearnerConfig settings that differ "
             "from LearnerConfig's defaults, `merge_logits` always shown (`fill`: DER++'s "
             "stored logits take the merged model's for the classes a merge added; `keep`: "
             "they stay). Alone "
             f"(seeds {', '.join(map(str, alone_seeds)) or '–'}): each site on its own "
             "stream, no federation, mean over sites (worst site). Central: one learner on all the "
             "sites' samples of that cut, interleaved round by round as the sensors push "
             "them (the order of arrival differs between cuts, and so does central's "
             "accuracy), mean over the row's seeds (worst seed). Δ central: after 10 rounds, "
             "the row's mean minus central's mean on the same cut and seeds, in points. Rounds 8–10: the mean over the last three rounds (one round's figure "
             "swings by several points).", "",
             "| sites | split | strategy | calibration | head fit | bn | bn variance | learner "
             "| seeds | alone | after 1 round | after 3 | after 10 | rounds 8–10 | central "
             "| Δ central |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    default = row_key({**DEFAULT, "sites": 0, "split": ""})
    keys = sorted({row_key(r) for r in sims}, key=lambda k: (
        k[0], k[1], *(a != b for a, b in zip(k[2:], default[2:])), k[2:]))
    for key in keys:
        runs = [r for r in sims if row_key(r) == key]
        solo = [a for r in results if r["kind"] == "alone" and (r["sites"], r["split"]) ==
                key[:2] for a in r["accuracy"]]
        cells = [str(key[0]), key[1], *(f"`{v}`" if v != "–" else v for v in key[2:]),
                 str(len(runs)), cell(solo)]
        for k in (1, 3, 10):
            means = [float(np.mean(r["accuracy"][k - 1])) for r in runs
                     if len(r["accuracy"]) >= k]
            worst = [min(r["accuracy"][k - 1]) for r in runs if len(r["accuracy"]) >= k]
            cells.append(f"{np.mean(means):.1%} ({min(worst):.1%})" if means else "–")
        cells.append(f"{np.mean([np.mean(r['accuracy'][-3:]) for r in runs]):.1%}")
        final = [float(np.mean(r["accuracy"][-1])) for r in runs]
        same = [central_by_run[k] for k in ((*key[:2], r["seed"]) for r in runs)
                if k in central_by_run]
        delta = (np.mean(final) - np.mean(same)) * 100 if same else float("nan")
        cells.append(f"{np.mean(same):.1%} ({min(same):.1%})" if same else "–")
        lines.append("| " + " | ".join(cells) + f" | {delta:+.1f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=200)
    p.add_argument("--grid", default="default,central,meanvar,before,before-fedavg,"
                                      "before-nocal,before-bn,fedavg,nocal,bn,alone",
                   help=f"which runs: {', '.join([*GRIDS, 'alone', 'central'])}")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--render", action="store_true", help="only render the saved results")
    p.add_argument("--write", metavar="MD")
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    jobs = make_jobs(args.grid.split(","), [int(s) for s in args.seeds.split(",")],
                     args.rounds, args.train_per_class)
    if not args.render:
        todo = [j for j in jobs if not (OUT / result_name(j)).exists()]
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            for r in pool.imap_unordered(run_job, todo):
                (OUT / result_name(r)).write_text(json.dumps(r))
    results = [json.loads((OUT / result_name(j)).read_text()) for j in jobs
               if (OUT / result_name(j)).exists()]
    text = render(results, "benchmarks/federation_sim.py " + " ".join(sys.argv[1:]))
    print(text)
    if args.write:
        write_section(Path(args.write), "federation-sim", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
