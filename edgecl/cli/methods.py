"""`edgecl methods`: every learning term, its parameters and the memory it adds (the table is
edgecl.methods.method_table)."""
from __future__ import annotations

import json

from edgecl.errors import UserError
from edgecl.methods import DEFAULT_CLASSES, DEFAULT_INPUT, method_table, render


def _parse_input(text: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--input must be CxHxW, e.g. 1x28x28, got {text!r}") from None
    if min(c, h, w) < 1:
        raise UserError(f"--input must be positive sizes, got {text!r}")
    return c, h, w


def cmd_methods(args) -> int:
    if args.classes < 1:
        raise UserError(f"--classes must be at least 1, got {args.classes}")
    table = method_table(_parse_input(args.input), args.classes)
    print(json.dumps(table, indent=1) if args.json else render(table))
    return 0


def register(sub) -> None:
    p = sub.add_parser("methods", help="list every learning term, its parameters and memory")
    p.add_argument("--input", default="x".join(map(str, DEFAULT_INPUT)),
                   help="sample shape CxHxW the memory figures assume (default 1x28x28)")
    p.add_argument("--classes", type=int, default=DEFAULT_CLASSES,
                   help="classes the student's head has (default 10)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_methods)
