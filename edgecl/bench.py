"""`edgecl bench split-mnist`: the class-incremental protocol on the bundled real digits.

Classes arrive in pairs, 400 training and 100 test digits per class, one pass, batch 10, and
the learner is never told where a pair starts. The home cut is pairs (0,1) ... (8,9) with one
fixed per-class split; the robustness protocol (`--orders K`) adds K random pairings, each
with its own random per-class split, and shifts: a short stream (`--train-per-class`) and
smaller inputs (`--size 14` or `8`, area-downsampled as a tiny sensor would see them).
`--iid` shuffles the same training samples into one class-free pass: the bound a learner
could reach on them without any class order. Each run (order x seed) is a fresh process, so
its peak RSS is its own. Accuracy is reported Class-IL (argmax over every class) and Task-IL
(argmax over the test image's own pair, as in the lecture's tables); summaries give the
mean, the standard deviation and the worst run.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict

import numpy as np

from edgecl.errors import UserError
from edgecl.report import plot_dir, plot_split_mnist

METHODS = ["finetune", "er", "der", "derpp", "derpp+ewcpp", "derpp+ewcpp+kd"]


def _logits(learner, x: np.ndarray, batch: int = 500) -> np.ndarray:
    """Eval-mode student logits, columns in the learner's label order."""
    import torch

    model = learner.eval_model()
    with torch.inference_mode():
        return np.concatenate([model(learner._to_tensor(x[i:i + batch])).numpy()
                               for i in range(0, len(x), batch)])


def evaluate(learner, x: np.ndarray, y: np.ndarray, pair: np.ndarray,
             pairs: list[tuple]) -> tuple[float, float]:
    """(Class-IL, Task-IL) percent of (x, y) classified right. Class-IL: argmax over every
    class. Task-IL: argmax over the classes of the test image's own pair (`pairs[pair[i]]`),
    the lecture's convention. Classes the learner never saw count as wrong."""
    if learner.student is None or len(x) == 0:
        return 0.0, 0.0
    logits = _logits(learner, x)
    labels = np.asarray(learner.labels)
    class_il = labels[logits.argmax(axis=1)] == y
    allowed = np.zeros(logits.shape, dtype=bool)
    for j, classes in enumerate(pairs):
        cols = [learner.index[c] for c in classes if c in learner.index]
        allowed[np.ix_(pair == j, cols)] = True
    masked = np.where(allowed, logits, -np.inf)
    task_il = (labels[masked.argmax(axis=1)] == y) & allowed.any(axis=1)
    return 100.0 * float(class_il.mean()), 100.0 * float(task_il.mean())


def learner_config(method: str, buffer: int, seed: int, teacher: str | None, **overrides):
    """The run's LearnerConfig, checked: a bad method, term parameter or setting is a
    one-line UserError. teacher None: an online teacher when the method has kd."""
    from edgecl.learn import LearnerConfig

    if teacher is None:
        teacher = "online" if "kd" in method.split("+") else "none"
    try:
        config = LearnerConfig(method=method, buffer_size=buffer, seed=seed, teacher=teacher,
                               **overrides)
        config.validate()
    except (TypeError, ValueError) as exc:
        raise UserError(str(exc)) from None
    return config


def protocol_stream(seed: int, order: int = 0, train_per_class: int | None = None,
                    size: int | None = None, iid: bool = False):
    """The stream of one run: `order` (0 home, else random pairs and cut), shortened to
    `train_per_class` per class (test set unchanged), resized to `size` pixels a side, and
    with `iid` shuffled into one class-free pass (seeded by `seed`)."""
    import dataclasses

    import edgecl.data as data

    stream = data.split_mnist(seed, order=order)
    if train_per_class is not None:
        stream = _shorter_stream(stream, train_per_class)
    if size is not None:
        stream = dataclasses.replace(stream, train_x=data.resize_area(stream.train_x, size),
                                     test_x=data.resize_area(stream.test_x, size))
    if iid:
        perm = np.random.default_rng([seed, 1]).permutation(len(stream.train_y))
        stream = dataclasses.replace(stream, train_x=stream.train_x[perm],
                                     train_y=stream.train_y[perm],
                                     train_task=np.zeros(len(perm), dtype=np.int64))
    return stream


def run_split_mnist(method: str = "derpp+ewcpp", buffer: int = 200, seed: int = 0,
                    teacher: str | None = None, batch: int = 10, progress: bool = False,
                    train_per_class: int | None = None, order: int = 0,
                    size: int | None = None, iid: bool = False, **overrides) -> dict:
    """One run of Split-MNIST (see `protocol_stream` for order, train_per_class, size and
    iid). Returns accuracies (percent), forgetting, speed, memory. With `iid` the accuracy
    matrix has one row and column (there are no pairs in time), and forgetting is 0."""
    from edgecl.learn import OnlineLearner
    from edgecl.learn.metrics import average_forgetting

    config = learner_config(method, buffer, seed, teacher, **overrides)
    teacher = config.teacher
    learner = OnlineLearner(config)
    stream = protocol_stream(seed, order, train_per_class, size, iid)
    n_tasks = 1 if iid else len(stream.tasks)
    acc_matrix = np.zeros((n_tasks, n_tasks))
    task_acc_matrix = np.zeros((n_tasks, n_tasks))
    train_seconds = cpu_seconds = 0.0
    total = len(stream.train_x)
    bar = _progress_bar(total, f"{method} buf={buffer} seed={seed}") if progress else None
    for start in range(0, total, batch):
        stop = min(start + batch, total)
        t0, c0 = time.perf_counter(), time.process_time()
        learner.learn_many(stream.train_x[start:stop], stream.train_y[start:stop].tolist())
        train_seconds += time.perf_counter() - t0
        cpu_seconds += time.process_time() - c0
        if bar is not None:
            bar.update(stop - start)
            bar.set_postfix(preq=f"{100 * learner.prequential.overall:.1f}%")
        task = stream.train_task[stop - 1]
        if stop == total or stream.train_task[stop] != task:
            acc_matrix[task], task_acc_matrix[task] = _accuracy_row(learner, stream, n_tasks, iid)
    if bar is not None:
        bar.close()
    stats = learner.stats()
    final_acc, final_task_acc = evaluate(learner, stream.test_x, stream.test_y,
                                         stream.test_task, stream.tasks)
    return {
        "method": method, "buffer": buffer, "seed": seed, "teacher": teacher,
        "order": order, "train_per_class": train_per_class, "size": size, "iid": iid,
        "train_samples": total, "tasks": [list(t) for t in stream.tasks],
        "final_acc": final_acc,  # Class-IL
        "final_task_acc": final_task_acc,  # Task-IL
        "acc_matrix": acc_matrix.round(2).tolist(),
        "task_acc_matrix": task_acc_matrix.round(2).tolist(),
        "forgetting": average_forgetting(acc_matrix),
        "prequential_acc": 100.0 * stats["prequential_acc"],
        "samples_per_s": total / train_seconds,
        # per CPU-second of this process (all its threads): steadier than wall time on a
        # shared machine, and equal to it on one thread with the core to itself
        "samples_per_cpu_s": total / max(cpu_seconds, 1e-9),
        "buffer_bytes": stats["buffer_bytes"],
        "terms_bytes": stats["terms_bytes"],
        "skipped_steps": stats["skipped_steps"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "config": asdict(config),
        "term_params": {t.name: {k: getattr(t, k) for k in t.defaults} for t in learner.terms},
    }


def _accuracy_row(learner, stream, n_tasks: int, iid: bool) -> tuple[list, list]:
    """(Class-IL, Task-IL) accuracy on each task's test digits (all of them when iid)."""
    rows = []
    for j in range(n_tasks):
        mask = (stream.test_task == j) | iid
        rows.append(evaluate(learner, stream.test_x[mask], stream.test_y[mask],
                             stream.test_task[mask], stream.tasks))
    return [r[0] for r in rows], [r[1] for r in rows]


def _shorter_stream(stream, train_per_class: int):
    """The first `train_per_class` stream samples of each class, order kept."""
    import dataclasses

    counts: dict[int, int] = {}
    keep = np.zeros(len(stream.train_y), dtype=bool)
    for i, label in enumerate(stream.train_y.tolist()):
        counts[label] = counts.get(label, 0) + 1
        keep[i] = counts[label] <= train_per_class
    return dataclasses.replace(stream, train_x=stream.train_x[keep],
                               train_y=stream.train_y[keep], train_task=stream.train_task[keep])


def _progress_bar(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="sample", file=sys.stderr, leave=False,
                mininterval=1.0)


def _run_keyed(kwargs: dict) -> tuple[dict, dict]:
    return kwargs, run_split_mnist(**kwargs)


def baseline_rss_mb() -> float:
    """Peak RSS of a bare `import torch, torchvision, onnxruntime` process: what every
    edgecl process pays before it does anything. Our memory figures subtract it."""
    code = ("import resource, torch, torchvision, onnxruntime;"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def run_each(runs: list[dict], jobs: int = 1):
    """Yield `(kwargs, result)` for every `run_split_mnist(**kwargs)` as each finishes, `jobs`
    at a time, every run in a fresh spawned process (its peak RSS is its own, and a crash or
    leak in one run cannot touch the next)."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(max(1, jobs), maxtasksperchild=1) as pool:
        yield from pool.imap_unordered(_run_keyed, runs)


def run_many(method: str, buffer: int, seeds: list[int], teacher: str | None,
             progress: bool = True, jobs: int = 1, orders: list[int] | None = None,
             **overrides) -> dict:
    """Every (order, seed) run of one configuration, each in a fresh process; mean, sd and
    worst over all of them. `orders` defaults to the home cut alone ([0])."""
    runs = [dict(method=method, buffer=buffer, seed=seed, teacher=teacher, order=order,
                 progress=progress and jobs == 1, **overrides)
            for order in (orders or [0]) for seed in seeds]
    results = [result for _, result in run_each(runs, jobs)]
    return summarize(sorted(results, key=lambda r: (r.get("order", 0), r["seed"])))


def summarize(runs: list[dict]) -> dict:
    def mean_sd(key):
        values = [r[key] for r in runs]
        return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    out = {"method": runs[0]["method"], "buffer": runs[0]["buffer"],
           "teacher": runs[0]["teacher"], "seeds": sorted({r["seed"] for r in runs}),
           "orders": sorted({r.get("order", 0) for r in runs}), "runs": runs}
    for key in ("final_acc", "final_task_acc", "forgetting", "samples_per_s",
                "samples_per_cpu_s", "prequential_acc", "peak_rss_mb"):
        if all(key in r for r in runs):  # results saved before Task-IL existed lack it
            out[f"{key}_mean"], out[f"{key}_sd"] = mean_sd(key)
    out["final_avg_acc"] = out["final_acc_mean"]
    out["final_acc_worst"] = min(r["final_acc"] for r in runs)
    return out


def mean_sd_text(summary: dict, key: str) -> str:
    """'90.6 ± 0.2' for a summarized key, '–' where the runs did not record it."""
    if f"{key}_mean" not in summary:
        return "–"
    return f"{summary[key + '_mean']:.1f} ± {summary[key + '_sd']:.1f}"


def format_table(results: list[dict], baseline_mb: float | None) -> str:
    """Markdown table of `run_many` summaries; peak RSS net of the bare-import baseline."""
    lines = ["| method | buffer | teacher | runs | Class-IL acc % | worst run % | Task-IL acc % | "
             "forgetting (points) | prequential acc % | samples/s | buffer bytes | "
             "extra term bytes | edgecl peak RSS MB |", "|" + "---|" * 13]
    for r in results:
        first = r["runs"][0]
        worst = r.get("final_acc_worst")
        lines.append(
            f"| {r['method']} | {r['buffer']} | {r['teacher']} | {len(r['runs'])} | "
            f"{mean_sd_text(r, 'final_acc')} | {'–' if worst is None else f'{worst:.1f}'} | "
            f"{mean_sd_text(r, 'final_task_acc')} | "
            f"{mean_sd_text(r, 'forgetting')} | {mean_sd_text(r, 'prequential_acc')} | "
            f"{r['samples_per_s_mean']:.0f} | {first['buffer_bytes']:,} | "
            f"{first['terms_bytes']:,} | {r['peak_rss_mb_mean'] - (baseline_mb or 0.0):.0f} |")
    return "\n".join(lines)


def _parse_seeds(text: str, flag: str = "--seeds") -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"{flag} must be comma-separated integers, got {text!r}") from None


def _parse_overrides(text: str) -> dict:
    """--set: a JSON object of LearnerConfig fields; unknown fields are named."""
    from dataclasses import fields

    from edgecl.learn import LearnerConfig

    if not text:
        return {}
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"--set must be a JSON object, e.g. '{{\"lr\": 0.05}}' ({exc})") from None
    if not isinstance(overrides, dict):
        raise UserError("--set must be a JSON object")
    known = {f.name for f in fields(LearnerConfig)}
    reserved = {"method", "buffer_size", "seed", "teacher"}
    for key in overrides:
        if key not in known or key in reserved:
            raise UserError(f"--set: {key!r} is not a learner setting --set can change "
                            f"(method, buffer, seeds and teacher have their own flags)")
    return overrides


STREAM_OPTIONS = ("orders", "train_per_class", "size", "iid")


def _protocol_options(args) -> dict:
    """The stream options of the command line, checked: which orders, how long, how big."""
    if args.orders < 0:
        raise UserError(f"--orders must be >= 0, got {args.orders}")
    orders = list(range(1, args.orders + 1)) if args.orders else [0]
    if args.order_ids:
        orders = _parse_seeds(args.order_ids, "--order-ids")
    if args.train_per_class is not None and not 1 <= args.train_per_class <= 400:
        raise UserError(f"--train-per-class must be in 1..400, got {args.train_per_class}")
    if args.size is not None and not 4 <= args.size <= 28:
        raise UserError(f"--size must be in 4..28 pixels, got {args.size}")
    return {"orders": orders, "train_per_class": args.train_per_class, "size": args.size,
            "iid": args.iid}


def _learner_overrides(overrides: dict) -> dict:
    return {k: v for k, v in overrides.items() if k not in STREAM_OPTIONS}


def cmd_split_mnist(args) -> int:
    seeds = _parse_seeds(args.seeds)
    methods = [m.strip() for m in args.method.split(",")]
    try:
        buffers = [int(b) for b in str(args.buffer).split(",")]
    except ValueError:
        raise UserError(f"--buffer must be comma-separated integers, got {args.buffer!r}") from None
    teacher = None if args.teacher == "auto" else args.teacher
    overrides = {**_parse_overrides(args.set), **_protocol_options(args)}
    if args.jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {args.jobs}")
    for method in methods:  # every error before the first run starts
        for buffer in buffers:
            learner_config(method, buffer, seeds[0] if seeds else 0, teacher,
                           **_learner_overrides(overrides))
    baseline = baseline_rss_mb()
    results = []
    for method in methods:
        for buffer in buffers:
            summary = run_many(method, buffer, seeds, teacher, progress=not args.quiet,
                               jobs=args.jobs, **overrides)
            results.append(summary)
            print(f"{method} buffer={buffer}: Class-IL {mean_sd_text(summary, 'final_acc')} % "
                  f"(worst {summary['final_acc_worst']:.1f} of {len(summary['runs'])} runs), "
                  f"Task-IL {mean_sd_text(summary, 'final_task_acc')} %, "
                  f"{summary['samples_per_s_mean']:.0f} samples/s", file=sys.stderr)
    print(format_table(results, baseline))
    print(f"\nbaseline peak RSS of bare torch+torchvision+onnxruntime: {baseline:.0f} MB "
          "(subtracted above)")
    for r in results:
        print(f"\n{r['method']} buffer={r['buffer']}: Class-IL accuracy after each pair (rows), "
              "per pair's test set (columns), seed", r["runs"][0]["seed"])
        for row in r["runs"][0]["acc_matrix"]:
            print("  " + "  ".join(f"{v:5.1f}" for v in row))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"baseline_rss_mb": baseline, "results": results}, fh, indent=1)
    if args.plot:
        for path in plot_split_mnist(results, args.plot):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def register(sub) -> None:
    bench = sub.add_parser("bench", help="run a benchmark")
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCHMARK")
    bench_sub.required = True
    p = bench_sub.add_parser("split-mnist", help="class-incremental Split-MNIST on MNIST-5k")
    p.add_argument("--method", default="derpp+ewcpp",
                   help=f"one or more, comma-separated: {', '.join(METHODS)}")
    p.add_argument("--buffer", default="200", help="replay buffer size(s), comma-separated")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--teacher", default="auto",
                   help="online | frozen:PATH | none | auto (online when the method has kd)")
    p.add_argument("--set", default="", help='learner overrides as JSON, e.g. \'{"lr": 0.05}\'')
    p.add_argument("--jobs", type=int, default=1,
                   help="seeds run at once, each in its own process (give each one torch "
                        "thread with --set '{\"threads\": 1}')")
    p.add_argument("--orders", type=int, default=0, metavar="K",
                   help="K random class orders, each with its own random per-class train/test "
                        "cut (0: the home cut, pairs (0,1)...(8,9)); runs = orders x seeds")
    p.add_argument("--order-ids", default="", metavar="LIST",
                   help="explicit order numbers instead, comma-separated (0 is the home cut)")
    p.add_argument("--train-per-class", type=int, default=None, metavar="N",
                   help="a short stream: the first N training digits of each class (test set "
                        "unchanged)")
    p.add_argument("--size", type=int, default=None, metavar="PX",
                   help="downsample every digit to PX x PX (e.g. 14 or 8), as a tiny sensor")
    p.add_argument("--iid", action="store_true",
                   help="shuffle the same training digits into one class-free pass (the bound)")
    p.add_argument("--json", metavar="PATH", help="also write every result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--plot", metavar="DIR", type=plot_dir,
                   help="draw the accuracy matrices and accuracy over the stream into DIR "
                        "(PNG and SVG; needs the plot extra)")
    p.set_defaults(func=cmd_split_mnist)
    from edgecl import bench_realtime  # edgecl bench realtime: its own module
    bench_realtime.register(bench_sub)
