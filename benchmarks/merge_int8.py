"""The int8 parity gate around a federated merge: why sites' snapshots are refused after one.

    .venv/bin/python benchmarks/merge_int8.py [--configs 3:disjoint] [--seeds 0]
        [--rounds 10] [--write BENCHMARKS.md]

The federation runs in process with edgecl's defaults (benchmarks/federation_sim.py). In every
round, just before the merge ("local": the site's own student after its local steps) and just
after it ("merged": what the daemon exports next), every site's student goes through the
daemon's export path (`export_student`: fp32 and int8 ONNX, the parity gate) with its replay
buffer as the int8 calibration set and, as its held-out slice, the test digits of the classes
in its stream. Reported per round and phase: how many sites' snapshots the gate passes, the
int8/fp32 top-1 agreement (mean and worst site), and the median top-1 margin of the fp32
logits against the median largest |int8 - fp32| logit error on the held-out digits.
Results go to bench-results/federation/merge-int8-*.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from federation import parse_configs  # noqa: E402
from federation_sim import OUT, make_jobs, simulate  # noqa: E402
from sections import write_section  # noqa: E402

PHASES = ("local", "merged")


def gate_figures(learner, stream, test_x, test_y) -> dict:
    """The daemon's export of `learner` now: the gate's verdict, agreement, margins."""
    from edgecl.export.onnx import export_student, run, session, to_model_input

    n = len(learner.buffer)
    mine = np.isin(test_y, stream.classes)
    result = export_student(learner.eval_model(), list(learner.labels),
                            tuple(learner.input_shape), learner.buffer.x[:n].copy(),
                            test_x[mine], list(test_y[mine]))
    x = to_model_input(test_x[mine], "uint8")
    f32, q8 = run(session(result.fp32), x), run(session(result.int8), x)
    top2 = np.sort(f32, axis=1)[:, -2:]   # a head with one class so far has no margin
    margin = float(np.median(top2[:, 1] - top2[:, 0])) if f32.shape[1] > 1 else None
    return {"passed": bool(result.passed), "agreement": result.parity.int8_agreement,
            "margin": margin,
            "int8_error": float(np.median(np.abs(q8 - f32).max(axis=1)))}


def measure(job: dict) -> dict:
    """One federation run with every site's export measured around every merge."""
    from edgecl.federation.trial import site_streams

    _, test_x, test_y = site_streams(job["sites"], job["split"], job["seed"], job["tpc"])
    figures: dict = {}

    def probe(round_no, phase, streams, learners):
        figures[f"{round_no}-{phase}"] = [gate_figures(learner, s, test_x, test_y)
                                          for s, learner in zip(streams, learners)]
        print(f"round {round_no} {phase}: " + ", ".join(
            f"{f['agreement']:.2f}{'' if f['passed'] else ' refused'}"
            for f in figures[f"{round_no}-{phase}"]), flush=True)

    simulate(job, probe)
    return {"sites": job["sites"], "split": job["split"], "seed": job["seed"],
            "rounds": job["rounds"], "figures": figures}


def result_path(sites: int, split: str, seed: int, rounds: int) -> Path:
    return OUT / f"merge-int8-{sites}{split}-r{rounds}-s{seed}.json"


def render(results: list[dict], command: str) -> str:
    lines = [
        "## int8 snapshots around a federated merge",
        "",
        f"Command: `{command}`. Machine: {os.cpu_count()} cores "
        f"({platform.processor() or platform.machine()}), no GPU, 1 thread. In process, "
        "edgecl's defaults, Split-MNIST on MNIST-5k (200 training digits per class). Each "
        "site's student goes through the daemon's export and parity gate just before the "
        "round's merge (*local*) and just after it (*merged*, what the daemon exports next), "
        "calibrated on its replay buffer, its held-out slice being the test digits of its "
        "stream's classes. *Passed*: sites whose snapshot passes the whole gate, int8 included, "
        "over all runs (when only int8 fails, the daemon publishes the fp32 model alone). "
        "*Agreement*: int8 top-1 = fp32 top-1, mean (worst site). *Margin / int8 error*: "
        "medians of the fp32 top-1 margin and of the largest |int8 - fp32| logit difference.",
        "",
        "| sites | split | round | phase | passed | agreement | margin / int8 error |",
        "|---|---|---|---|---|---|---|",
    ]
    for sites, split in sorted({(r["sites"], r["split"]) for r in results}):
        runs = [r for r in results if (r["sites"], r["split"]) == (sites, split)]
        for round_no in range(1, runs[0]["rounds"] + 1):
            for phase in PHASES:
                sites_figs = [f for r in runs for f in r["figures"][f"{round_no}-{phase}"]]
                agree = [f["agreement"] for f in sites_figs]
                lines.append(
                    f"| {sites} | {split} | {round_no} | {phase} | "
                    f"{sum(f['passed'] for f in sites_figs)}/{len(sites_figs)} | "
                    f"{np.mean(agree):.1%} ({min(agree):.1%}) | "
                    f"{median([f['margin'] for f in sites_figs])} / "
                    f"{np.median([f['int8_error'] for f in sites_figs]):.2f} |")
    return "\n".join(lines) + "\n"


def median(values: list) -> str:
    known = [v for v in values if v is not None]
    return f"{np.median(known):.2f}" if known else "–"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="3:disjoint")
    p.add_argument("--seeds", default="0")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--render", action="store_true", help="only render the saved results")
    p.add_argument("--write", metavar="MD")
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    wanted = parse_configs(args.configs)
    jobs = [j for j in make_jobs(["default"], seeds, args.rounds, 200)
            if (j["sites"], j["split"]) in wanted]
    for job in jobs:
        path = result_path(job["sites"], job["split"], job["seed"], job["rounds"])
        if not args.render and not path.exists():
            path.write_text(json.dumps(measure(job)))
    paths = [result_path(j["sites"], j["split"], j["seed"], j["rounds"]) for j in jobs]
    results = [json.loads(p.read_text()) for p in paths if p.exists()]
    text = render(results, "benchmarks/merge_int8.py " + " ".join(sys.argv[1:]))
    print(text)
    if args.write:
        write_section(Path(args.write), "merge-int8", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
