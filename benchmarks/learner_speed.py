"""Learner speed on the Split-MNIST stream: stream samples learned per second, batch 10.

All configurations run in one process, one after another, on the same 1,000 digits, so
their ratios are comparable even on a shared machine. The first 100 samples of each run are
a warm-up and not timed.

    .venv/bin/python benchmarks/learner_speed.py [--samples 1000] [--threads 2] [--json PATH]
        [--only 1,3,4] [--profile N]

Wall-clock samples/s, and samples per CPU-second of the process (steadier on a shared
machine). `--profile N` also runs torch.profiler over N batches of the default and prints
its top operators by self CPU time.
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

WARMUP = 100
TWO_DRAWS = {"derpp": {"shared_draw": False}}
DEFAULT = f"derpp+ewcpp (default: one shared draw, {LearnerConfig().iterations} iterations)"
CONFIGS = [
    ("finetune, 1 iteration", dict(method="finetune", iterations=1)),
    ("er, 1 iteration", dict(method="er", iterations=1)),
    (DEFAULT, dict(method="derpp+ewcpp")),
    ("derpp+ewcpp as before (two draws, 1 iteration, eval-mode prediction)",
     dict(method="derpp+ewcpp", iterations=1, predict_in_eval=True, terms=TWO_DRAWS)),
    ("derpp+ewcpp, two draws, 1 iteration", dict(method="derpp+ewcpp", iterations=1,
                                                terms=TWO_DRAWS)),
    ("derpp+ewcpp, shared draw, 1 iteration", dict(method="derpp+ewcpp", iterations=1)),
    ("default, Fisher every 50 steps", dict(method="derpp+ewcpp",
                                            terms={"ewcpp": {"fisher_every": 50}})),
    ("default, channels_last off", dict(method="derpp+ewcpp", channels_last=False)),
    ("default + kd, online ResNet-20 teacher", dict(method="derpp+ewcpp+kd", teacher="online")),
    ("derpp+ewcpp, shared draw, 2 iterations", dict(method="derpp+ewcpp", iterations=2)),
    ("derpp+ewcpp, shared draw, 4 iterations", dict(method="derpp+ewcpp", iterations=4)),
    # latent replay: the 28x28 layers (stem and the first two stages) frozen once the timed
    # part starts, replayed samples enter past them
    ("default + latent replay, 4 layers", dict(method="derpp+ewcpp", latent_layers=4,
                                               latent_after=WARMUP)),
    ("default + latent replay, 7 layers", dict(method="derpp+ewcpp", latent_layers=7,
                                               latent_after=WARMUP)),
    # round 3: what EWC++ costs at four steps, and the same steps with plain ER
    ("er, 4 iterations", dict(method="er", iterations=4)),
    ("derpp (no EWC++), 4 iterations", dict(method="derpp", iterations=4)),
    ("derpp+ewcpp, 4 iterations, Fisher on every 10th batch's first step",
     dict(method="derpp+ewcpp", iterations=4, terms={"ewcpp": {"fisher_per_batch": True}})),
]


def measure(config: dict, x, y, batch: int, cpu: bool = False):
    """Samples/s after the warm-up: wall clock, and with `cpu` also per CPU-second."""
    learner = OnlineLearner(LearnerConfig(buffer_size=200, seed=0, **config))
    for i in range(0, WARMUP, batch):
        learner.learn_many(x[i:i + batch], y[i:i + batch])
    start, cpu_start = time.perf_counter(), time.process_time()
    for i in range(WARMUP, len(x), batch):
        learner.learn_many(x[i:i + batch], y[i:i + batch])
    n = len(x) - WARMUP
    wall = n / (time.perf_counter() - start)
    return (wall, n / (time.process_time() - cpu_start)) if cpu else wall


def step_ceiling(batch: int, steps: int = 40) -> str:
    """The bare student, no learner: one SGD step of forward and backward on 2 x `batch`
    images (a stream batch and one replay draw of the same size, the default's step), so the
    stream rate that `iterations` steps per batch allow with nothing else to do."""
    import torch.nn.functional as F
    from edgecl.models import build_student

    torch.manual_seed(0)
    model = build_student(10, 1, 28).to(memory_format=torch.channels_last).train()
    x = torch.rand(2 * batch, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (2 * batch,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for i in range(steps + 5):
        if i == 5:
            start = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    per_step = (time.perf_counter() - start) / steps
    iterations = LearnerConfig().iterations
    return (f"bare student step on {2 * batch} images (28x28): {per_step * 1000:.1f} ms, so at "
            f"most {batch / per_step:.0f} stream samples/s with 1 step per batch and "
            f"{batch / (iterations * per_step):.0f} with {iterations}")


def profile_default(x, y, batch: int, batches: int) -> str:
    """torch.profiler's top operators (self CPU) over `batches` steps of the default."""
    from torch.profiler import ProfilerActivity, profile

    learner = OnlineLearner(LearnerConfig(buffer_size=200, seed=0))
    for i in range(0, WARMUP * 3, batch):
        learner.learn_many(x[i:i + batch], y[i:i + batch])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(WARMUP * 3, WARMUP * 3 + batches * batch, batch):
            learner.learn_many(x[i:i + batch], y[i:i + batch])
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows) or 1
    lines = ["| operator | self CPU % | calls per step |", "|---|---|---|"]
    for e in rows[:12]:
        lines.append(f"| `{e.key}` | {100 * e.self_cpu_time_total / total:.1f} | "
                     f"{e.count / batches:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--only", default="", help="comma-separated row numbers of CONFIGS "
                        "(1-based); the default always runs")
    parser.add_argument("--profile", type=int, default=0, metavar="N")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    stream = split_mnist(seed=0)
    x, y = stream.train_x[: args.samples], stream.train_y[: args.samples].tolist()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {args.threads} threads, load average "
          f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("| configuration | stream samples/s | samples per CPU-s | relative to the default |")
    print("|---|---|---|---|")
    only = {int(n) for n in args.only.split(",") if n.strip()}
    results = {}
    for row, (name, cfg) in enumerate(CONFIGS, 1):
        if only and row not in only and name != DEFAULT:
            continue
        results[name] = measure(cfg, x, y, args.batch, cpu=True)
    base = results[DEFAULT][0]
    for name, (rate, cpu_rate) in results.items():
        print(f"| {name} | {rate:.0f} | {cpu_rate:.0f} | {rate / base:.2f}x |", flush=True)
    print("\n" + step_ceiling(args.batch))
    if args.profile:
        print(f"\ntorch.profiler, default learner, {args.profile} batches of {args.batch}:")
        print(profile_default(stream.train_x, stream.train_y.tolist(), args.batch, args.profile))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"threads": args.threads, "samples": args.samples, "results": results},
                      fh, indent=1)


if __name__ == "__main__":
    main()
