"""`edgecl report STATE_DIR`: draw a daemon's story from its time series (the figures are
edgecl.report's)."""
from __future__ import annotations

from pathlib import Path

from edgecl.report import Story, story_figures, write_html, write_images


def cmd_report(args) -> int:
    story = Story.load(args.state_dir)
    figures = story_figures(story)
    out = Path(args.out)
    if out.suffix.lower() in (".html", ".htm"):
        write_html(story, figures, out, args.state_dir)
        print(f"wrote {out}")
    else:
        for path in write_images(figures, out, formats=tuple(args.format.split(","))):
            print(f"wrote {path}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("report", help="draw a daemon's story from its state directory",
                       description="Prequential accuracy over the stream (overall and per "
                                   "class), when each class appeared, each snapshot's held-out "
                                   "accuracy (fp32 and int8), queue depth and learning rate "
                                   "over time, from STATE_DIR/timeseries.jsonl. Needs the "
                                   "'plot' extra (matplotlib).")
    p.add_argument("state_dir", metavar="STATE_DIR")
    p.add_argument("--out", default="report.html", metavar="PATH",
                   help="an .html file (figures inline), or a directory for image files "
                        "(default report.html)")
    p.add_argument("--format", default="png", help="image formats for a directory --out, "
                                                  "comma-separated: png, svg, pdf (default png)")
    p.set_defaults(func=cmd_report)
