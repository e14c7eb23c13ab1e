"""The method-zoo table in BENCHMARKS.md: every term alone and the useful combinations.

Every term registered in `edgecl.learn.terms.TERMS` runs alone: at buffer 0 if it does not
read the buffer (at 200 it would learn the same), else at buffer 200; `finetune` runs at
buffer 0; DER++ plus each other term runs at buffer 200 (DER++ is the replay baseline the
combinations must beat), and DER + subspace for the lecture's "DER + SD" row. Split-MNIST (`edgecl bench split-mnist`'s protocol), seeds
0, 1, 2, one torch thread per run, `--jobs` runs at once, each in a fresh process.

Every run's JSON goes to bench-results/methods/ as it finishes, and runs already there are
skipped, so an interrupted table resumes. Then the table (mean ± sd over seeds: Class-IL,
Task-IL, forgetting, samples/s, memory added) is printed beside the lecture's S-MNIST numbers,
and `--write` puts it into BENCHMARKS.md between `<!-- methods:begin -->` and
`<!-- methods:end -->`. `--render` only renders from the saved files.

    .venv/bin/python benchmarks/methods.py --jobs 2 --write            # the whole table
    .venv/bin/python benchmarks/methods.py --seeds 0 --methods ewc --buffers 0 --limit 40
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from edgecl.bench import mean_sd_text, run_each, summarize
from edgecl.learn.terms import TERMS
from sections import write_section  # benchmarks/, the script's own folder

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench-results" / "methods"
REPLAY = ("er", "der", "derpp")

# The reference lecture's S-MNIST table (regularization-based class-incremental learning;
# trained on all 60,000 MNIST digits), as (Class-IL, Task-IL) %, quoted for the shape only.
# Buffer 0: its no-memory rows (oEWC is online EWC: our ewc with gamma 1 and ewcpp). Buffer
# 200: its "small memory" rows, whose ER and DER figures are the DER paper's buffer-200 ones.
LECTURE = {
    ("finetune", 0): (19.90, 87.15),
    ("lwf", 0): (20.07, 99.25),
    ("ewc", 0): (20.00, 99.10),
    ("ewcpp", 0): (20.00, 99.10),
    ("si", 0): (19.97, 99.07),
    ("er", 200): (80.43, 97.86),
    ("der", 200): (84.55, 98.80),
    ("subspace", 200): (85.28, 97.71),
    ("der+subspace", 200): (86.54, 98.86),
}


def reads_buffer(name: str) -> bool:
    """Every term that draws from the replay buffer has a `draw` size parameter."""
    return "draw" in TERMS[name].defaults


def grid() -> list[tuple[str, int]]:
    """(method, buffer) pairs of the table, in table order."""
    singles = list(TERMS)
    rows = [("finetune", 0)] + [(name, 0) for name in singles if not reads_buffer(name)]
    # a term that does not read the buffer would learn the same at 200: not run twice
    rows += [(name, 200) for name in singles if reads_buffer(name)]
    rows += [(f"derpp+{name}", 200) for name in singles if name not in REPLAY]
    if "subspace" in TERMS:
        rows.append(("der+subspace", 200))
    return rows


def result_path(out: Path, method: str, buffer: int, seed: int) -> Path:
    return out / f"{method.replace('+', '-')}_b{buffer}_s{seed}.json"


def machine() -> str:
    import torch
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return (f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"torch {torch.__version__}; load average {load} at start")


def run(rows: list[tuple[str, int]], seeds: list[int], jobs: int, out: Path,
        limit: int | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    todo = [dict(method=m, buffer=b, seed=s, threads=1, train_per_class=limit)
            for m, b in rows for s in seeds if not result_path(out, m, b, s).exists()]
    print(f"{len(todo)} runs to do, {jobs} at a time; {machine()}", file=sys.stderr)
    if todo:
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        (out / "machine.txt").write_text(f"{machine()}\nstarted {when}\n")
    started = time.perf_counter()
    for i, (kwargs, result) in enumerate(run_each(todo, jobs), 1):
        path = result_path(out, kwargs["method"], kwargs["buffer"], kwargs["seed"])
        path.write_text(json.dumps(result, indent=1))
        print(f"[{i}/{len(todo)} {time.perf_counter() - started:.0f}s] {kwargs['method']} "
              f"buffer={kwargs['buffer']} seed={kwargs['seed']}: Class-IL "
              f"{result['final_acc']:.1f} %, Task-IL {result['final_task_acc']:.1f} %",
              file=sys.stderr)


def render(rows: list[tuple[str, int]], seeds: list[int], out: Path) -> str:
    """The table over the seeds that have results; a row run on fewer seeds than asked says
    how many in its `seeds` column and shows no ± (one run has no spread)."""
    lines = ["| method | buffer | seeds | Class-IL % | Task-IL % | forgetting (points) | "
             "samples/s (1 thread) | memory added (bytes) | lecture Class-IL / Task-IL % |",
             "|" + "---|" * 9]
    missing = []
    for method, buffer in rows:
        paths = [result_path(out, method, buffer, s) for s in seeds]
        done = [p for p in paths if p.exists()]
        if not done:
            missing.append(f"{method}@{buffer}")
            continue
        r = summarize([json.loads(p.read_text()) for p in done])
        first = r["runs"][0]
        lecture = LECTURE.get((method, buffer))

        def cell(key: str) -> str:
            return mean_sd_text(r, key) if len(done) > 1 else f"{r[key + '_mean']:.1f}"

        lines.append(
            f"| {method} | {buffer} | {len(done)} | {cell('final_acc')} | "
            f"{cell('final_task_acc')} | {cell('forgetting')} | "
            f"{r['samples_per_s_mean']:.0f} | {first['terms_bytes'] + first['buffer_bytes']:,} | "
            f"{'%.2f / %.2f' % lecture if lecture else ''} |")
    text = "\n".join(lines)
    if missing:
        text += f"\n\nNot run yet: {', '.join(missing)}."
    return text


def section(table: str, seeds: list[int], out: Path, command: str) -> str:
    machine_file = out / "machine.txt"
    where = machine_file.read_text().strip().replace("\n", "; ") if machine_file.exists() else "?"
    return f"""## Method zoo: every term on Split-MNIST, Class-IL and Task-IL

**Protocol.** As the learner table above (MNIST-5k, pairs in order, one pass, batch 10,
task-free), seeds {', '.join(map(str, seeds))} (the `seeds` column says how many a row has),
mean ± sd. Class-IL: argmax over all classes
seen; Task-IL: argmax over the test image's own pair (the lecture's convention). Memory added:
what the method's terms hold at the end of the run (importance vectors, anchors, windows,
the anchor model) plus the replay buffer. Each term's defaults (`edgecl methods`); combinations
are DER++ plus one more term. The lecture's numbers are its S-MNIST table, trained on the full
MNIST training set (60,000 digits against our 4,000), so they are a reference for the shape,
not a like-for-like target; its buffer-200 rows are its "small memory" ones.

**Command.** {command} (every run in its own process, one torch thread; raw results in
`bench-results/methods/`). **Machine.** {where}.

{table}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (default 2)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default="", help="only these methods, comma-separated")
    parser.add_argument("--buffers", default="", help="only these buffer sizes, e.g. 0,200")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="smoke run: N training digits per class (results kept apart)")
    parser.add_argument("--render", action="store_true", help="only render saved results")
    parser.add_argument("--write", action="store_true", help="put the table in BENCHMARKS.md")
    parser.add_argument("--benchmarks-md", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument("--command", default=None,
                        help="with --render --write: the run commands to name in the section")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = grid()
    if args.methods:
        wanted = args.methods.split(",")
        unknown = [m for m in wanted if m not in {m for m, _ in rows}]
        if unknown:
            raise SystemExit(f"methods.py: not in the table: {', '.join(unknown)}; "
                             f"known: {', '.join(dict.fromkeys(m for m, _ in rows))}")
        rows = [r for r in rows if r[0] in wanted]
    if args.buffers:
        rows = [r for r in rows if r[1] in {int(b) for b in args.buffers.split(",")}]
    out = OUT if args.limit is None else OUT.with_name(f"methods-limit{args.limit}")
    if not args.render:
        run(rows, seeds, args.jobs, out, args.limit)
    table = render(rows, seeds, out)
    print(table)
    if args.write:
        command = args.command or "`python benchmarks/methods.py {}`".format(
            " ".join(a for a in sys.argv[1:] if a != "--write"))
        write_section(Path(args.benchmarks_md), "methods", section(table, seeds, out, command))


if __name__ == "__main__":
    main()
