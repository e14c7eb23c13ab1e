"""What a merge does to BatchNorm statistics: `[federation] bn` = global, local, refresh.

    .venv/bin/python benchmarks/federation_bn.py [--seeds 0,1] [--rounds 10] [--jobs 2]
        [--render] [--write BENCHMARKS.md]

The federation without the network, so that the three settings can be compared on several
seeds in minutes: 3 sites on disjoint Split-MNIST classes (edgecl/federation/trial.py,
200 training digits per class), each an `OnlineLearner` with the daemon's defaults on one
thread; each round every site learns the next 1/rounds of its stream in pushes of 32, the
sites' students are aggregated class-aware (edgecl/federation/aggregate.py) and merged back
with `OnlineLearner.merge_global(..., bn)`, exactly the code a daemon runs for `model.merge`.
Scored after each round's merge on the 1,000 test digits of all ten classes (eval mode, as
exported): the mean over sites. Results go to bench-results/federation/bn-*.json.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from sections import write_section  # noqa: E402

OUT = ROOT / "bench-results" / "federation"
MODES = ("global", "local", "refresh")
BATCH = 32


def simulate(job: dict) -> dict:
    from edgecl.federation.aggregate import SiteModel, aggregate
    from edgecl.federation.trial import site_streams
    from edgecl.learn import OnlineLearner

    streams, tx, ty = site_streams(3, "disjoint", job["seed"], job["train_per_class"])
    learners = [OnlineLearner(seed=job["seed"], threads=1) for _ in streams]
    per_round = []
    for r in range(job["rounds"]):
        models = []
        for s, learner in zip(streams, learners):
            part = np.array_split(np.arange(len(s.y)), job["rounds"])[r]
            for start in range(0, len(part), BATCH):
                idx = part[start:start + BATCH]
                learner.learn_many(s.x[idx], s.y[idx].tolist())
            models.append(SiteModel(list(learner.labels), list(learner.class_counts),
                                    learner.learned_since_merge, dict(learner.model_arrays()),
                                    name=s.name))
        glob = aggregate(models, "class-aware")
        for learner in learners:
            learner.merge_global(glob.labels, glob.arrays, job["bn"])
        accs = [float(np.mean(np.asarray(l.predict_many(tx)) == ty)) for l in learners]
        per_round.append(float(np.mean(accs)))
        print(f"bn={job['bn']} seed {job['seed']} round {r + 1}: {per_round[-1]:.3f}",
              flush=True)
    return {**job, "accuracy": per_round}


def result_name(job: dict) -> str:
    return f"bn-{job['bn']}-s{job['seed']}-r{job['rounds']}.json"


def render(results: list[dict], command: str) -> str:
    lines = ["## Federation: BatchNorm statistics at a merge", "",
             f"Command: `{command}`. Machine: {os.cpu_count()} cores, no GPU, one learner "
             "thread per site. 3 sites, disjoint classes, class-aware aggregation, "
             "in-process (no network; the merge is the daemon's own code). Mean accuracy of "
             "the sites on all ten digits after the round's merge; mean over seeds "
             "(worst seed).", "",
             "| bn | after 1 round | after 3 | after 10 |", "|---|---|---|---|"]
    for mode in MODES:
        runs = [r for r in results if r["bn"] == mode]
        if not runs:
            continue
        cells = []
        for k in (1, 3, 10):
            vals = [r["accuracy"][k - 1] for r in runs if len(r["accuracy"]) >= k]
            cells.append(f"{np.mean(vals):.1%} ({min(vals):.1%})" if vals else "–")
        lines.append(f"| `{mode}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=200)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--render", action="store_true", help="only render the saved results")
    p.add_argument("--write", metavar="MD")
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    jobs = [{"bn": m, "seed": int(s), "rounds": args.rounds,
             "train_per_class": args.train_per_class}
            for s in args.seeds.split(",") for m in MODES]
    if not args.render:
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            for r in pool.map(simulate, jobs):
                (OUT / result_name(r)).write_text(json.dumps(r))
    results = [json.loads((OUT / result_name(j)).read_text()) for j in jobs
               if (OUT / result_name(j)).exists()]
    text = render(results, "benchmarks/federation_bn.py " + " ".join(sys.argv[1:]))
    print(text)
    if args.write:
        write_section(Path(args.write), "federation-bn", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
