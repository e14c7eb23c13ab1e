"""What the int8 parity gate can detect at each held-out size: its power, computed exactly
(binomial arithmetic in edgecl.export.gate, no simulation), for docs/snapshots.md.

    .venv/bin/python benchmarks/gate_power.py [--alpha 0.05] [--limit 0.01] [--agreement 0.98]

Accuracy check: each held-out sample is independently "fp32 right, int8 wrong" with
probability `loss` and the reverse with `gain`; the true drop is loss - gain. Agreement check:
int8's top-1 differs from fp32's with probability `rate` on each of n + 32 samples (the
held-out slice plus the 32 replay-buffer samples the gate adds).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgecl.export.gate import (min_detectable_drop, power_accuracy,  # noqa: E402
                                power_agreement)

SIZES = (20, 44, 100, 200, 256)
EXTRA = 32  # buffer samples added to the agreement check (edgecl.export.onnx.MAX_PARITY_EXTRA)


def accuracy_table(alpha: float, limit: float) -> str:
    cases = [("no drop, 2 % discordant (1 % each way)", 0.01, 0.01),
             ("drop = limit, 1.5 % / 0.5 %", limit + 0.005, 0.005),
             ("2-point drop, one-way", 0.02, 0.0),
             ("5-point drop, one-way", 0.05, 0.0),
             ("5-point drop, 7 % / 2 %", 0.07, 0.02),
             ("10-point drop, one-way", 0.10, 0.0)]
    head = "| held-out n | smallest drop it can reject | " + " | ".join(c[0] for c in cases)
    rows = [head + " |", "|---" * (len(cases) + 2) + "|"]
    for n in SIZES:
        mdd = min_detectable_drop(n, limit, alpha)
        cells = [f"{power_accuracy(n, loss, gain, limit, alpha):.0%}" for _, loss, gain in cases]
        rows.append(f"| {n} | {'none' if mdd is None else f'{mdd * 100:.1f} points'} | "
                    + " | ".join(cells) + " |")
    return "\n".join(rows)


def agreement_table(alpha: float, min_agreement: float) -> str:
    rates = (0.01, 0.02, 0.04, 0.06, 0.10)
    rows = ["| samples checked (n + 32) | " + " | ".join(f"true disagreement {r:.0%}"
                                                       for r in rates) + " |",
            "|---" * (len(rates) + 1) + "|"]
    for n in SIZES:
        cells = [f"{power_agreement(n + EXTRA, r, min_agreement, alpha):.0%}" for r in rates]
        rows.append(f"| {n + EXTRA} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--limit", type=float, default=0.01, help="gate_max_accuracy_drop")
    ap.add_argument("--agreement", type=float, default=0.98, help="gate_min_int8_agreement")
    args = ap.parse_args()
    print(f"Probability of rejection, alpha {args.alpha:g}, accuracy limit "
          f"{args.limit * 100:g} points:\n")
    print(accuracy_table(args.alpha, args.limit))
    print(f"\nAgreement check, min agreement {args.agreement:.0%}:\n")
    print(agreement_table(args.alpha, args.agreement))
    return 0


if __name__ == "__main__":
    sys.exit(main())
