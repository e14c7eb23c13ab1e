"""The robustness protocol: candidate learner configurations on random class orders and cuts.

Every candidate runs `edgecl bench split-mnist`'s `run_split_mnist` on K random orders (each a
random pairing of the ten digits with its own random 400/100 per-class cut) x seeds, one pass,
task-free, batch 10, one torch thread per run and `--jobs` runs at once. Shifts run the same
candidates on a short stream (100 training digits per class), on 8x8 and 14x14 inputs, on a
short 8x8 stream, and (`iid`) on the short 8x8 samples shuffled into one class-free pass,
the bound beside it. Each run's result is kept in bench-results/protocol/ and reused, so the
command can be stopped and resumed; `--render` prints the frontier table (accuracy mean and
worst run against samples per CPU-second) and `--plot PATH` draws it.

    .venv/bin/python benchmarks/protocol.py --candidates default,er --orders 5 --seeds 0,1,2
    .venv/bin/python benchmarks/protocol.py --shift short8 --candidates default --orders 5
    .venv/bin/python benchmarks/protocol.py --render [--plot docs/frontier.png]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

from edgecl.bench import run_each

OUT = Path("bench-results/protocol")
SHORT_PREFIX = "derpp+ewcpp/shared/"  # shortened in the figure's labels


def _derpp(shared: bool, iterations: int = 1, derpp: dict | None = None,
           ewcpp: dict | None = None, method: str = "derpp+ewcpp", **settings) -> dict:
    """derpp+ewcpp with every setting the defaults have moved on spelled out, so a result
    file keeps its meaning whatever the defaults become; `derpp` and `ewcpp` add term
    parameters."""
    terms = {"derpp": {"shared_draw": shared, **(derpp or {})}}
    if ewcpp:
        terms["ewcpp"] = ewcpp
    return dict(method=method, iterations=iterations, terms=terms, **settings)


CANDIDATES = {
    # name: LearnerConfig settings; buffer comes from --buffer
    "old-default": _derpp(False, predict_in_eval=True),  # edgecl's default before this table
    "er": dict(method="er", iterations=1, predict_in_eval=True),
    "er-ace": dict(method="er", iterations=1, stream_loss="ace"),
    "derpp+ewcpp": _derpp(False),
    "derpp+ewcpp/ace": _derpp(False, stream_loss="ace"),
    "derpp+ewcpp/shared": _derpp(True),
    "derpp+ewcpp/ace/shared": _derpp(True, stream_loss="ace"),
    "derpp+ewcpp/ace/cbrs": _derpp(False, stream_loss="ace", buffer_policy="balanced"),
    "derpp+ewcpp/ace/bn0.6": _derpp(False, stream_loss="ace", bn_momentum=0.6),
    "derpp+ewcpp/ace/iter2": _derpp(False, 2, stream_loss="ace"),
    "derpp+ewcpp/la": _derpp(False, logit_adjust=1.0),
    "derpp+ewcpp/shared/la": _derpp(True, logit_adjust=1.0),
    "derpp+ewcpp/iter2": _derpp(False, 2),
    "derpp+ewcpp/la/iter2": _derpp(False, 2, logit_adjust=1.0),
    "er/la": dict(method="er", iterations=1, logit_adjust=1.0),
    "derpp+ewcpp/m0.9": _derpp(False, lr=0.02, momentum=0.9),
    "derpp+ewcpp/shared/iter2": _derpp(True, 2),  # the default since this table
    "derpp+ewcpp/shared/iter3": _derpp(True, 3),
    "derpp+ewcpp/shared/iter2/cbrs": _derpp(True, 2, buffer_policy="balanced"),
    # round 2: sample efficiency (optimizer, BatchNorm, iterations) and latent replay
    "derpp+ewcpp/shared/iter4": _derpp(True, 4),
    "derpp+ewcpp/shared/iter2/lr0.1": _derpp(True, 2, lr=0.1),
    "derpp+ewcpp/shared/iter2/bn0.6": _derpp(True, 2, bn_momentum=0.6),
    "derpp+ewcpp/shared/iter2/bnrefresh": _derpp(True, 2, bn_refresh=True),
    "derpp+ewcpp/shared/iter1/bnrefresh": _derpp(True, 1, bn_refresh=True),
    "derpp+ewcpp/shared/iter2/adam1e-3": _derpp(True, 2, optimizer="adam", lr=0.001),
    "derpp+ewcpp/shared/iter2/adam3e-3": _derpp(True, 2, optimizer="adam", lr=0.003),
    "derpp+ewcpp/shared/iter2/adam1e-2/bn0.6": _derpp(True, 2, optimizer="adam", lr=0.01,
                                                      bn_momentum=0.6),
    "derpp+ewcpp/shared/iter2/adam3e-3/bn0.6": _derpp(True, 2, optimizer="adam", lr=0.003,
                                                      bn_momentum=0.6),
    "derpp+ewcpp/shared/iter4/adam3e-3": _derpp(True, 4, optimizer="adam", lr=0.003),
    "derpp+ewcpp/shared/iter4/adam3e-3/latent4@400": _derpp(
        True, 4, optimizer="adam", lr=0.003, latent_layers=4, latent_after=400),
    "derpp+ewcpp/shared/iter4/latent4@400": _derpp(True, 4, latent_layers=4, latent_after=400),
    "derpp+ewcpp/shared/iter4/latent4": _derpp(True, 4, latent_layers=4, latent_after=1000),
    "er/iter4": dict(method="er", iterations=4),
    # round 3: head initialization, more steps per batch
    "derpp+ewcpp/shared/iter4/imprint": _derpp(True, 4, head_init="imprint"),
    "derpp+ewcpp/shared/iter6": _derpp(True, 6),
    "derpp+ewcpp/shared/iter8": _derpp(True, 8),
    "derpp+ewcpp/shared/iter4/keeplast": _derpp(True, 4, keep_from="last"),
    "derpp+ewcpp/shared/iter4/fisherbatch": _derpp(True, 4, ewcpp={"fisher_per_batch": True}),
    "derpp+ewcpp/shared/iter4/draw25": _derpp(True, 4, derpp={"draw": 25}),
    "derpp+ewcpp/shared/iter4/correct": _derpp(True, 4, derpp={"correct_only": True}),
    "derpp/shared/iter4": _derpp(True, 4, method="derpp"),
    "derpp+ewcpp/shared/iter4/a0.1": _derpp(True, 4, derpp={"alpha": 0.1}),
    "derpp+ewcpp/shared/iter4/b1": _derpp(True, 4, derpp={"beta": 1.0}),
    "derpp+ewcpp/shared/iter4/l0.1": _derpp(True, 4, ewcpp={"lam": 0.1}),
}

SHIFTS = {
    "base": {},
    "short": {"train_per_class": 100},
    "size14": {"size": 14},
    "size8": {"size": 8},
    "short8": {"train_per_class": 100, "size": 8},
    "short8-iid": {"train_per_class": 100, "size": 8, "iid": True},
}


def run_key(candidate: str, buffer: int, shift: str, order: int, seed: int) -> Path:
    safe = candidate.replace("/", "_").replace("+", "p")
    return OUT / f"{safe}__b{buffer}__{shift}__o{order}__s{seed}.json"


def pending_runs(candidates, buffer, shift, orders, seeds):
    for name in candidates:
        config = dict(CANDIDATES[name])
        for order in orders:
            for seed in seeds:
                path = run_key(name, buffer, shift, order, seed)
                if not path.exists():
                    yield path, dict(buffer=buffer, seed=seed, order=order, threads=1,
                                     **SHIFTS[shift], **config), name


def run(candidates, buffer, shift, orders, seeds, jobs) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    todo = list(pending_runs(candidates, buffer, shift, orders, seeds))
    where = {json.dumps(kw, sort_keys=True): (path, name) for path, kw, name in todo}
    print(f"{len(todo)} runs to do, {jobs} at a time", file=sys.stderr)
    for kwargs, result in run_each([kw for _, kw, _ in todo], jobs):
        path, name = where[json.dumps(kwargs, sort_keys=True)]
        result.update(candidate=name, shift=shift, load_average=os.getloadavg())
        path.write_text(json.dumps(result))
        print(f"{name} {shift} b{buffer} order {kwargs['order']} seed {kwargs['seed']}: "
              f"{result['final_acc']:.1f} %", file=sys.stderr, flush=True)


def load_results() -> dict:
    groups: dict[tuple, list] = {}
    for path in sorted(OUT.glob("*.json")):
        r = json.loads(path.read_text())
        stream = "home cut" if r["order"] == 0 else r["shift"]  # the fixed cut, apart
        groups.setdefault((r["candidate"], r["buffer"], stream), []).append(r)
    return groups


def summary_row(runs: list[dict]) -> dict:
    accs = [r["final_acc"] for r in runs]
    return {"n": len(runs), "mean": statistics.mean(accs),
            "sd": statistics.stdev(accs) if len(accs) > 1 else 0.0, "worst": min(accs),
            "cpu_rate": statistics.mean(r["samples_per_cpu_s"] for r in runs),
            "orders": len({r["order"] for r in runs}), "seeds": len({r["seed"] for r in runs})}


def render(shift_filter: str | None = None) -> str:
    lines = ["| candidate | buffer | stream | runs (orders x seeds) | Class-IL mean ± sd % | "
             "worst run % | samples per CPU-s (1 thread) |", "|" + "---|" * 7]
    for (name, buffer, shift), runs in sorted(load_results().items(),
                                             key=lambda kv: (kv[0][2], kv[0][1], kv[0][0])):
        if shift_filter and shift != shift_filter:
            continue
        s = summary_row(runs)
        lines.append(f"| {name} | {buffer} | {shift} | {s['n']} ({s['orders']} x {s['seeds']}) "
                     f"| {s['mean']:.1f} ± {s['sd']:.1f} | {s['worst']:.1f} | "
                     f"{s['cpu_rate']:.0f} |")
    return "\n".join(lines)


def plot(path: str) -> None:
    """Frontier: mean (dot) and worst run (cross) against speed, base stream, per buffer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (name, buffer, shift), runs in sorted(load_results().items()):
        if shift != "base":
            continue
        s = summary_row(runs)
        color = "tab:blue" if buffer == 200 else "tab:orange"
        ax.plot(s["cpu_rate"], s["mean"], "o", color=color)
        ax.plot(s["cpu_rate"], s["worst"], "x", color=color)
        ax.annotate(f"{name.replace(SHORT_PREFIX, 'd/')} ({buffer})", (s["cpu_rate"], s["mean"]),
                    fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("stream samples per CPU-second (1 thread)")
    ax.set_ylabel("final Class-IL accuracy % (o mean, x worst run)")
    ax.set_title("Split-MNIST robustness protocol: random orders and cuts\n"
                 f"(d/ = {SHORT_PREFIX}; buffer in brackets)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", default="old-default,derpp+ewcpp")
    parser.add_argument("--buffer", type=int, default=200)
    parser.add_argument("--shift", default="base", choices=sorted(SHIFTS))
    parser.add_argument("--orders", default="5",
                        help="K (random orders 1..K), 0 (the home cut) or a list like 0,1,2")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--render", action="store_true", help="only print the table")
    parser.add_argument("--plot", metavar="PNG")
    parser.add_argument("--write", metavar="MD", help="put the table in this file's "
                        "`protocol` section (BENCHMARKS.md), with the command and machine")
    parser.add_argument("--command", default="", help="the command line(s) to quote there")
    parser.add_argument("--section", default="protocol", help="the BENCHMARKS.md section to "
                        "write (a new name keeps an earlier round's table)")
    parser.add_argument("--title", default="Robustness protocol: random class orders and "
                        "cuts, shifts", help="that section's heading")
    args = parser.parse_args()
    orders = ([int(o) for o in args.orders.split(",") if o.strip()] if "," in args.orders
              else list(range(1, int(args.orders) + 1)) or [0])  # 0: the home cut alone
    names = [c.strip() for c in args.candidates.split(",")]
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        raise SystemExit(f"unknown candidate(s) {unknown}; known: {', '.join(CANDIDATES)}")
    if not args.render:
        run(names, args.buffer, args.shift, orders, [int(s) for s in args.seeds.split(",")],
            args.jobs)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; load average now "
          f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(render())
    if args.plot:
        plot(args.plot)
    if args.write:
        from sections import write_section
        write_section(Path(args.write), args.section,
                      section_text(args.command, args.plot, args.title))


def section_text(command: str, plot_path: str | None, title: str) -> str:
    """The BENCHMARKS.md section: what ran, where, and the table (and figure)."""
    loads = [r["load_average"][0] for runs in load_results().values() for r in runs
             if "load_average" in r]
    lines = [f"## {title}", "",
             "Each row: the candidate on K random orders (a random pairing of the ten digits, "
             "each with its own random 400/100 per-class cut) x seeds; one pass, task-free, "
             "batch 10, one torch thread per run, two runs at a time. Class-IL accuracy on the "
             "run's 1,000 test digits after the stream. Speed is stream samples per CPU-second "
             "of the run's process (one thread), which a shared machine disturbs less than "
             "wall time.", "",
             f"Command: {command or '`.venv/bin/python benchmarks/protocol.py ...`'}", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"Python {platform.python_version()}; load average (1 min) when runs ended: "
             f"{min(loads):.1f} to {max(loads):.1f}." if loads else "", "",
             render()]
    if plot_path:
        lines += ["", f"![accuracy against speed]({plot_path})"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
