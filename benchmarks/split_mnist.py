"""The Split-MNIST table in BENCHMARKS.md: every method at buffers 200 and 500, 3 seeds.

Runs `edgecl bench split-mnist` once per buffer size, the two in parallel with one torch
thread each (2 cores), writing bench-results/split_mnist_b{200,500}.{json,txt}; then prints
one markdown table from the JSON files. `--render` only prints the table from existing files.

    .venv/bin/python benchmarks/split_mnist.py [--render] [--seeds 0,1,2]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from edgecl.bench import format_table

METHODS = "finetune,er,der,derpp,derpp+ewcpp,derpp+ewcpp+kd"
BUFFERS = (200, 500)
OUT = Path("bench-results")


def run(seeds: str) -> None:
    OUT.mkdir(exist_ok=True)
    procs = []
    for b in BUFFERS:
        cmd = [sys.executable, "-m", "edgecl", "bench", "split-mnist", "--method", METHODS,
               "--buffer", str(b), "--seeds", seeds, "--set", '{"threads": 1}', "--quiet",
               "--json", str(OUT / f"split_mnist_b{b}.json")]
        procs.append(subprocess.Popen(cmd, stdout=open(OUT / f"split_mnist_b{b}.txt", "w")))
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"benchmark failed: {p.args}")


def render() -> str:
    rows = []
    baseline = None
    for b in BUFFERS:
        data = json.loads((OUT / f"split_mnist_b{b}.json").read_text())
        baseline = data["baseline_rss_mb"]
        rows.extend(data["results"])
    rows.sort(key=lambda r: (METHODS.split(",").index(r["method"]), r["buffer"]))
    lines = [format_table(rows, baseline).replace("samples/s", "samples/s (1 thread)", 1)]
    lines.append(f"\nPeak RSS is each seed's own process minus a bare `import torch, torchvision, "
                 f"onnxruntime` process ({baseline:.0f} MB).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--render", action="store_true", help="only print the table")
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    if not args.render:
        run(args.seeds)
    print(render())


if __name__ == "__main__":
    main()
