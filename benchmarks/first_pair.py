"""What the student knows after the first pair of a short stream: eval-mode and train-mode
(batch statistics) test accuracy on that pair, per learner setting.

A short stream gives each pair 200 digits, 20 batches. If eval mode is at chance but train
mode is right, BatchNorm's running statistics are to blame; if both are at chance, the
student has not learned the pair yet (sample efficiency).

    .venv/bin/python benchmarks/first_pair.py [--orders 1,2,3,4,5] [--train-per-class 100]
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from edgecl.bench import evaluate, protocol_stream
from edgecl.learn import LearnerConfig, OnlineLearner

SETTINGS = {
    "2 steps (the previous default)": dict(iterations=2),
    "2 steps, BatchNorm momentum 0.6": dict(iterations=2, bn_momentum=0.6),
    "2 steps, Adam lr 3e-3": dict(iterations=2, optimizer="adam", lr=0.003),
    "4 steps (the default)": dict(iterations=4),
}


def first_pair(settings: dict, order: int, train_per_class: int) -> tuple[float, float]:
    """(eval-mode, train-mode) accuracy % on the first pair's test digits after its stream."""
    stream = protocol_stream(0, order, train_per_class)
    learner = OnlineLearner(LearnerConfig(threads=1, seed=0, **settings))
    n = int((stream.train_task == 0).sum())
    for i in range(0, n, 10):
        learner.learn_many(stream.train_x[i:i + 10], stream.train_y[i:i + 10].tolist())
    mask = stream.test_task == 0
    x, y = stream.test_x[mask], stream.test_y[mask]
    eval_acc = evaluate(learner, x, y, stream.test_task[mask], stream.tasks)[0]
    learner.student.train()
    with torch.no_grad():
        guess = learner.student(learner._to_tensor(x)).argmax(1).numpy()
    train_acc = 100.0 * float(np.mean(np.asarray(learner.labels)[guess] == y))
    return eval_acc, train_acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", default="1,2,3,4,5")
    parser.add_argument("--train-per-class", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    orders = [int(o) for o in args.orders.split(",")]
    print(f"first pair of a {args.train_per_class}-per-class stream, random orders {orders}, "
          "seed 0; test accuracy % on that pair, eval mode / train mode (batch statistics)")
    print("| setting | " + " | ".join(f"order {o}" for o in orders) + " |")
    print("|---|" + "---|" * len(orders))
    for name, settings in SETTINGS.items():
        cells = [first_pair(settings, o, args.train_per_class) for o in orders]
        print(f"| {name} | " + " | ".join(f"{e:.0f} / {t:.0f}" for e, t in cells) + " |",
              flush=True)


if __name__ == "__main__":
    main()
