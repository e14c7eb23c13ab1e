"""Single-seed design probes behind the choices in docs/learning.md and BENCHMARKS.md.

Each variant is one Split-MNIST run (seed 0, buffer 200, derpp+ewcpp unless named) in a fresh
process, beside the default. One seed is a probe, not a result: a variant that looks better
here goes through benchmarks/split_mnist.py (3 seeds) before it becomes a default. Also
measures how fast eval-mode accuracy follows train-mode accuracy at the start of a stream.

    .venv/bin/python benchmarks/ablations.py [--threads 2]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os

import numpy as np

VARIANTS = [
    ("default (stride rule 'early', 4x4 last map)", {}),
    ("stride rule 'late' (4.8 M MACs)", {"stride_relax": "late"}),
    ("2x2 last map (min_final_map 2)", {"min_final_map": 2}),
    ("EWC++ lambda 5", {"terms": {"ewcpp": {"lam": 5.0}}}),
    ("learn batch 32 instead of 10", {"batch": 32}),
    ("BatchNorm momentum 0.6", {"bn_momentum": 0.6}),
]


def _run(kwargs: dict) -> dict:
    from edgecl.bench import run_split_mnist
    return run_split_mnist(method="derpp+ewcpp", buffer=200, seed=0, **kwargs)


def eval_lag(bn_momentum: float, threads: int) -> list[tuple[int, float]]:
    """finetune on the (0, 1) pair; eval-mode test accuracy every 10 steps."""
    import torch

    from edgecl.data import split_mnist
    from edgecl.learn import LearnerConfig, OnlineLearner

    torch.set_num_threads(threads)
    s = split_mnist(seed=0, tasks=[(0, 1)], train_per_class=400)
    learner = OnlineLearner(LearnerConfig(method="finetune", bn_momentum=bn_momentum))
    curve = []
    for step, i in enumerate(range(0, len(s.train_x), 10), start=1):
        learner.learn_many(s.train_x[i:i + 10], s.train_y[i:i + 10].tolist())
        if step % 10 == 0:
            acc = np.mean(np.array(learner.predict_many(s.test_x)) == s.test_y)
            curve.append((step, 100 * float(acc)))
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores, load average "
          f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}; seed 0, buffer 200")
    print("| variant | final acc % | prequential acc % | forgetting | samples/s |")
    print("|---|---|---|---|---|")
    ctx = mp.get_context("spawn")
    for name, variant in VARIANTS:
        kwargs = {"threads": args.threads, **variant}
        with ctx.Pool(1) as pool:
            r = pool.apply(_run, (kwargs,))
        print(f"| {name} | {r['final_acc']:.1f} | {r['prequential_acc']:.1f} | "
              f"{r['forgetting']:.1f} | {r['samples_per_s']:.0f} |", flush=True)
    print("\nEval-mode test accuracy (%) on digits 0/1 while fine-tuning on them, by step:")
    for momentum in (0.1, 0.6):
        curve = eval_lag(momentum, args.threads)
        print(f"  BatchNorm momentum {momentum}: "
              + ", ".join(f"step {s}: {a:.1f}" for s, a in curve))


if __name__ == "__main__":
    main()
