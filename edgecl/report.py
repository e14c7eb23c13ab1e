"""Pictures (matplotlib, the `plot` extra): the figures `edgecl report STATE_DIR` draws of a
daemon's story from its time series (edgecl/serve/timeseries.py; the command is
edgecl/cli/report.py), and those `edgecl bench split-mnist --plot DIR` draws of the
benchmark's accuracy matrices and accuracy over the stream.

Figures are matplotlib Figures whose artists carry ids (`gid`): the HTML report inlines them
as SVG with text kept as text, so a reader (and the tests) can find each class's line and
each snapshot's label in the file.
"""
from __future__ import annotations

import html
import io
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgecl.errors import UserError
from edgecl.serve.timeseries import FILE, read

FIGURE_FILES = ("accuracy", "snapshots", "queue-lr")


@dataclass
class Story:
    """A time series file, sorted out by kind."""
    points: list = field(default_factory=list)
    classes: list = field(default_factory=list)     # {"label", "n", "t"}, in order of arrival
    snapshots: list = field(default_factory=list)   # {"v", "n", "t", "fp32", "int8"}
    rejected: list = field(default_factory=list)
    starts: list = field(default_factory=list)

    @classmethod
    def load(cls, state_dir: str | Path) -> "Story":
        root = Path(state_dir)
        if not root.is_dir():
            raise UserError(f"{root}: no such state directory")
        records = read(root / FILE)
        story = cls()
        kinds = {"point": story.points, "class": story.classes, "snapshot": story.snapshots,
                 "rejected": story.rejected, "start": story.starts}
        for record in records:
            kinds.get(record["k"], []).append(record)
        if not story.points:
            raise UserError(f"{root / FILE}: no time series yet; a daemon records one while it "
                            "runs (edgecl serve, edgecl demo --state-dir DIR)")
        story.points.sort(key=lambda p: p["t"])
        return story


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams["svg.fonttype"] = "none"  # text stays text in SVG
    return plt


def accuracy_figure(story: Story):
    """Prequential accuracy over the stream (overall, recent, per class), and when each class
    appeared."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1.4]})
    pts = sorted(story.points, key=lambda p: p["n"])
    n = [p["n"] for p in pts]
    colors = plt.get_cmap("tab10" if len(story.classes) <= 10 else "tab20")
    for i, cls in enumerate(story.classes):
        label = cls["label"]
        xs = [p["n"] for p in pts if label in p.get("pc", {})]
        ys = [100 * p["pc"][label] for p in pts if label in p.get("pc", {})]
        top.plot(xs, ys, lw=1, alpha=0.6, color=colors(i % colors.N), label=f"class {label}",
                 gid=f"acc-class-{label}")
        bottom.barh(i, max(n[-1] - cls["n"], 1), left=cls["n"], height=0.6,
                    color=colors(i % colors.N), gid=f"class-{label}")
    top.plot(n, [_pct(p.get("acc")) for p in pts], color="black", lw=2.2, label="overall",
             gid="acc-overall")
    top.plot(n, [_pct(p.get("win")) for p in pts], color="black", lw=1.2, ls="--",
             label="recent window", gid="acc-window")
    for start in story.starts[1:]:
        for ax in (top, bottom):
            ax.axvline(start["n"], color="grey", ls=":", lw=1, gid="restart")
    top.set(ylabel="prequential accuracy (%)", ylim=(0, 100),
            title="Prequential accuracy over the stream (predicted before learned)")
    top.legend(fontsize=7, ncol=4, loc="lower left")
    top.grid(alpha=0.3)
    bottom.set_yticks(range(len(story.classes)), [c["label"] for c in story.classes], fontsize=7)
    bottom.set(xlabel="samples learned", ylabel="class", title="When each class appeared")
    bottom.invert_yaxis()
    fig.tight_layout()
    return fig


def snapshots_figure(story: Story):
    """Each published snapshot's held-out accuracy, fp32 and int8; rejected exports marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    snaps = [s for s in story.snapshots if s.get("n") is not None]
    for kind, marker, gid in (("fp32", "o", "snapshot-fp32"), ("int8", "s", "snapshot-int8")):
        pairs = [(s["n"], 100 * s[kind]) for s in snaps if s.get(kind) is not None]
        if pairs:
            ax.plot(*zip(*pairs), marker=marker, ls="-", label=f"held-out accuracy {kind}",
                    gid=gid, alpha=0.8)
    for s in snaps:
        best = max((s.get("fp32") or 0, s.get("int8") or 0))
        ax.annotate(f"v{s['v']}", (s["n"], 100 * best), textcoords="offset points",
                    xytext=(0, 6), ha="center", fontsize=8, gid=f"snapshot-v{s['v']}")
    rejected = [r for r in story.rejected if r.get("n") is not None]
    if rejected:
        ax.plot([r["n"] for r in rejected], [2] * len(rejected), "x", color="red", ms=9,
                label="rejected by the parity gate", gid="snapshot-rejected")
    if not snaps:
        ax.text(0.5, 0.5, "no snapshot published yet", transform=ax.transAxes, ha="center")
    ax.set(xlabel="samples learned at export", ylabel="held-out accuracy (%)", ylim=(0, 105),
           title="Snapshots: held-out accuracy of each published version")
    ax.grid(alpha=0.3)
    if snaps or rejected:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def queue_lr_figure(story: Story):
    """Ingest queue depth and learning rate over wall-clock time."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5), sharex=True)
    t0 = story.points[0]["t"]
    minutes = [(p["t"] - t0) / 60 for p in story.points]
    top.plot(minutes, [p.get("q") or 0 for p in story.points], color="tab:orange",
             gid="queue-depth")
    top.set(ylabel="queue depth (samples)", title="Ingest queue: acked, not yet learned")
    lr = [(m, p["lr"]) for m, p in zip(minutes, story.points) if p.get("lr") is not None]
    if lr:
        bottom.step(*zip(*lr), where="post", color="tab:blue", gid="learning-rate")
    bottom.set(xlabel="minutes since the first point", ylabel="learning rate",
               title="Learning rate")
    for start in story.starts[1:]:
        for ax in (top, bottom):
            ax.axvline((start["t"] - t0) / 60, color="grey", ls=":", lw=1, gid="restart")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _pct(value):
    return None if value is None else 100 * value


def story_figures(story: Story) -> dict:
    return dict(zip(FIGURE_FILES, (accuracy_figure(story), snapshots_figure(story),
                                   queue_lr_figure(story))))


def svg_text(fig) -> str:
    """The figure as an <svg> element to inline in HTML."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    text = buf.getvalue()
    return text[text.index("<svg"):]


def write_images(figures: dict, directory: Path, formats=("png",)) -> list[Path]:
    plt = _pyplot()
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in figures.items():
        for fmt in formats:
            path = directory / f"{name}.{fmt}"
            fig.savefig(path, dpi=110)
            written.append(path)
        plt.close(fig)
    return written


def summary_html(story: Story, state_dir: str) -> str:
    last = story.points[-1]
    span = (last["t"] - story.points[0]["t"]) / 60
    rows = "".join(f"<tr><td>v{s['v']}</td><td>{s.get('n')}</td><td>{_cell(s.get('fp32'))}"
                   f"</td><td>{_cell(s.get('int8'))}</td></tr>" for s in story.snapshots)
    classes = ", ".join(f"{html.escape(c['label'])} (at {c['n']})" for c in story.classes)
    return (f"<h1>edgecl report: {html.escape(str(state_dir))}</h1>"
            f"<p>{len(story.points)} points over {span:.1f} minutes, {len(story.starts)} "
            f"start(s); {last['n']} samples learned, {last.get('r')} received; prequential "
            f"accuracy {_cell(last.get('acc'))}.</p>"
            f"<p>Classes in order of appearance (samples learned at the time): {classes or '-'}"
            "</p><table id='snapshots'><tr><th>version</th><th>samples learned</th>"
            f"<th>held-out fp32</th><th>held-out int8</th></tr>{rows}</table>"
            f"<p>{len(story.rejected)} export(s) rejected by the parity gate, "
            f"{sum(bool(r.get('fp32_published')) for r in story.rejected)} of them published "
            "as fp32 alone (held-out int8 '-': their int8 model was held back).</p>")


def _cell(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def write_html(story: Story, figures: dict, out: Path, state_dir: str) -> None:
    plt = _pyplot()
    parts = [f"<figure id='{name}'>{svg_text(fig)}</figure>" for name, fig in figures.items()]
    for fig in figures.values():
        plt.close(fig)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    out.write_text("<!doctype html><html><head><meta charset='utf-8'><title>edgecl report"
                   "</title><style>body{font-family:sans-serif;max-width:960px;margin:auto}"
                   "td,th{padding:2px 10px;text-align:right}</style></head><body>"
                   + summary_html(story, state_dir) + "".join(parts)
                   + f"<p><small>written {stamp}</small></p></body></html>\n")


# ---------------------------------------------------------------------------- bench --plot

def plot_dir(text: str) -> str:
    """argparse type of `--plot DIR`: matplotlib must be there before a long run starts."""
    import argparse

    from edgecl.extras import missing_extras
    if missing_extras("plot"):
        raise argparse.ArgumentTypeError("--plot needs matplotlib: pip install 'edgecl[plot]'")
    return text


def _run_name(result: dict) -> str:
    return f"{result['method']} (buffer {result['buffer']})"


def _mean_matrix(result: dict, key: str = "acc_matrix"):
    return np.mean([np.asarray(run[key]) for run in result["runs"]], axis=0)


def accuracy_matrix_figure(results: list[dict]):
    """Class-IL accuracy after each task (rows) on each task's test set (columns), mean over
    seeds, one heat map per method; every cell annotated with its value."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(3.0 * len(results) + 1.2, 3.9),
                             squeeze=False, layout="constrained")
    image = None
    for ax, result in zip(axes[0], results):
        matrix = _mean_matrix(result)
        ax.set_gid(f"matrix-{_run_name(result)}")
        image = ax.imshow(matrix, vmin=0, vmax=100, cmap="viridis")
        for i, j in np.ndindex(*matrix.shape):
            ax.text(j, i, f"{matrix[i, j]:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if matrix[i, j] < 60 else "black", gid=f"cell-{i}-{j}")
        ticks = range(matrix.shape[0])
        ax.set_xticks(ticks, [str(t + 1) for t in ticks])
        ax.set_yticks(ticks, [str(t + 1) for t in ticks])
        ax.set_title(f"{_run_name(result)}\n{len(result['runs'])} seed(s)", fontsize=8)
        ax.set_xlabel("tested on task")
    axes[0][0].set_ylabel("after training task")
    fig.colorbar(image, ax=list(axes[0]), label="Class-IL accuracy (%)", shrink=0.9)
    return fig


def stream_accuracy_figure(results: list[dict]):
    """Average Class-IL accuracy over the tasks seen so far, after each task of the stream,
    per method (mean over seeds, band: one standard deviation)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for result in results:
        curves = np.array([[np.mean(np.asarray(run["acc_matrix"])[i, :i + 1])
                            for i in range(len(run["acc_matrix"]))] for run in result["runs"]])
        per_task = result["runs"][0]["train_samples"] / curves.shape[1]
        x = per_task * np.arange(1, curves.shape[1] + 1)
        mean, sd = curves.mean(axis=0), curves.std(axis=0)
        line, = ax.plot(x, mean, marker="o", label=_run_name(result),
                        gid=f"stream-{_run_name(result)}")
        ax.fill_between(x, mean - sd, mean + sd, color=line.get_color(), alpha=0.15)
    ax.set(xlabel="training samples seen", ylabel="accuracy on tasks seen so far (%)",
           ylim=(0, 100), title="Split-MNIST: accuracy over the stream (Class-IL)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_split_mnist(results: list[dict], directory: str) -> list[Path]:
    """DIR/split-mnist-acc-matrix.{png,svg} and DIR/split-mnist-stream.{png,svg}."""
    figures = {"split-mnist-acc-matrix": accuracy_matrix_figure(results),
               "split-mnist-stream": stream_accuracy_figure(results)}
    return write_images(figures, Path(directory), formats=("png", "svg"))
