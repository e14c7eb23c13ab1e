"""Learner speed on the Split-MNIST stream: stream samples learned per second, batch 10.

All configurations run in one process, one after another, on the same 1,000 digits, so
their ratios are comparable even on a shared machine. The first 100 samples of each run are
a warm-up and not timed.

    .venv/bin/python benchmarks/learner_speed.py [--samples 1000] [--threads 2] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from edgecl.data import split_mnist
from edgecl.learn import LearnerConfig, OnlineLearner

CONFIGS = [
    ("finetune", dict(method="finetune")),
    ("derpp", dict(method="derpp")),
    ("derpp+ewcpp", dict(method="derpp+ewcpp")),
    ("derpp+ewcpp, Fisher every 50 steps", dict(method="derpp+ewcpp",
                                                terms={"ewcpp": {"fisher_every": 50}})),
    ("derpp+ewcpp, channels_last off", dict(method="derpp+ewcpp", channels_last=False)),
    ("derpp+ewcpp+kd, online ResNet-20 teacher", dict(method="derpp+ewcpp+kd", teacher="online")),
]
WARMUP = 100


def measure(config: dict, x, y, batch: int) -> float:
    learner = OnlineLearner(LearnerConfig(buffer_size=200, seed=0, **config))
    for i in range(0, WARMUP, batch):
        learner.learn_many(x[i:i + batch], y[i:i + batch])
    start = time.perf_counter()
    for i in range(WARMUP, len(x), batch):
        learner.learn_many(x[i:i + batch], y[i:i + batch])
    return (len(x) - WARMUP) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    stream = split_mnist(seed=0)
    x, y = stream.train_x[: args.samples], stream.train_y[: args.samples].tolist()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {args.threads} threads, load average "
          f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("| configuration | stream samples/s | relative to derpp+ewcpp |")
    print("|---|---|---|")
    results = {name: measure(cfg, x, y, args.batch) for name, cfg in CONFIGS}
    base = results["derpp+ewcpp"]
    for name, rate in results.items():
        print(f"| {name} | {rate:.0f} | {rate / base:.2f}x |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"threads": args.threads, "samples": args.samples, "results": results},
                      fh, indent=1)


if __name__ == "__main__":
    main()
