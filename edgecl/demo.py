"""`edgecl demo` (what `make demo` runs): the daemon on a free port, two sensors streaming
Split-MNIST, live status, then a clean stop and a held-out score."""
from __future__ import annotations


def cmd_demo(args) -> int:
    from edgecl.serve.demo import run_demo
    return run_demo(args)


def register(sub) -> None:
    p = sub.add_parser("demo", help="stream Split-MNIST through a local daemon and score it")
    p.add_argument("--method", default="derpp+ewcpp")
    p.add_argument("--buffer", type=int, default=200)
    p.add_argument("--limit", type=int, default=None, help="stream only the first N digits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--state-dir", dest="state_dir", default=None, metavar="DIR",
                   help="keep the daemon's state here (new or empty), e.g. for "
                        "`edgecl report DIR` (default: a temporary directory)")
    p.add_argument("--status-every", dest="status_every", type=float, default=2.0,
                   help="seconds between status lines")
    p.set_defaults(func=cmd_demo)
