"""The "realtime" section of BENCHMARKS.md: `edgecl bench realtime` for both overload policies,
plus the stored-logits choice for offered samples at 10 L.

    .venv/bin/python benchmarks/realtime.py            # runs both, then writes the section
    .venv/bin/python benchmarks/realtime.py --render   # only writes it from bench-results/

Writes bench-results/realtime.json (the policy sweep), bench-results/realtime_logits.json
(`learner.offer_logits = "none"` at 10 L with the sweep's L) and docs/figures/realtime.png.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import machine  # noqa: E402  benchmarks/, this folder
from sections import write_section  # noqa: E402

from edgecl.bench_realtime import format_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench-results"
SWEEP, LOGITS = OUT / "realtime.json", OUT / "realtime_logits.json"
FACTORS = "1,3,10,100"   # 0.5 L, the default's first point, adds 11 minutes a policy


def run() -> None:
    OUT.mkdir(exist_ok=True)
    bench = [sys.executable, "-m", "edgecl", "bench", "realtime"]
    subprocess.run([*bench, "--factors", FACTORS, "--json", str(SWEEP), "--plot",
                    str(ROOT / "docs/figures/realtime.png")], check=True)
    rate = json.loads(SWEEP.read_text())["learn_rate"]
    subprocess.run([*bench, "--factors", "10", "--policies", "realtime", "--no-tenth",
                    "--learn-rate", str(rate), "--set", '{"learner.offer_logits": "none"}',
                    "--json", str(LOGITS)], check=True)


def render(machine_text: str, note: str = "") -> str:
    sweep = json.loads(SWEEP.read_text())
    rows = sweep["rows"]
    text = ["## realtime: sensors faster than the learner", "",
            f"`edgecl bench realtime`: the 4,000 Split-MNIST training digits (pairs 0/1 ... 8/9 "
            f"in order) pushed through a real daemon (its own process, default settings, "
            f"learner on 1 torch thread) by {sweep['sensors']} sensors on a fixed clock at R "
            f"samples/s. L = {sweep['learn_rate']:.1f} samples/s is the daemon's own learning "
            "rate, measured first. A sensor never waits: a `busy` push is dropped (counted "
            "under *dropped by sensors*). Accuracy on the 1,000 test digits, of the learner at "
            "the end and of the snapshot a device pulls then (fp32 / int8; *rejected*: the "
            "gate refused the last export, so the device kept an older one). One seed (0) per "
            "row.", "", format_table(sweep), ""]
    if LOGITS.exists():
        logits = json.loads(LOGITS.read_text())["rows"][0]
        same = next((r for r in rows if r["policy"] == "realtime" and r["factor"] == 10), None)
        text += ["Stored logits of offered samples, realtime at 10 L (`learner.offer_logits`):",
                 "", "| offer_logits | learner acc | trained | offered only |", "|---|---|---|---|"]
        if same:
            text.append(f"| forward (default) | {same['learner_acc']:.1%} | {same['trained']} "
                        f"| {same['offered']} |")
        text += [f"| none | {logits['learner_acc']:.1%} | {logits['trained']} | "
                 f"{logits['offered']} |", ""]
    text += ["![accuracy against R](docs/figures/realtime.png)", "",
             "Command: `.venv/bin/python benchmarks/realtime.py` (script: "
             f"`benchmarks/realtime.py`, which runs `edgecl bench realtime`). Machine: "
             f"{machine_text} (when this section was written).", *(["", note] if note else [])]
    return "\n".join(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--render", action="store_true", help="only write the section")
    parser.add_argument("--note", default="", help="a paragraph about the run, appended")
    args = parser.parse_args()
    machine_text = machine()
    if not args.render:
        run()
    text = render(machine_text, args.note)
    print(text)
    write_section(ROOT / "BENCHMARKS.md", "realtime", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
