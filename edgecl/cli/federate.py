"""`edgecl federate`: many sites, one model, on Flower (docs/federation.md).

    edgecl federate local      a whole federation on this box, on Split-MNIST, to try it out
    edgecl federate app DIR    write the Flower App directory that `flwr run DIR` takes
    edgecl federate tls DIR    a private CA and the SuperLink's TLS certificate
    edgecl federate node-key DIR --name SITE   a SuperNode's key pair (node authentication)
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("federate", help="federate daemons with Flower",
                              description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="federate_command", metavar="WHAT")
    sub.required = True
    local = sub.add_parser("local", help="run a whole federation on this box (Split-MNIST)",
                           description="Start one daemon and one Flower SuperNode per site "
                           "and a SuperLink, push each site its part of Split-MNIST, run the "
                           "rounds with `flwr run`, print each site's accuracy on all ten "
                           "digits after every round, and stop every process.")
    local.add_argument("--sites", type=int, default=3)
    local.add_argument("--split", choices=("disjoint", "overlap"), default="disjoint")
    local.add_argument("--rounds", type=int, default=3)
    local.add_argument("--strategy", choices=("class-aware", "fedavg"), default="class-aware")
    local.add_argument("--calibration", choices=("features", "none"), default="features",
                       help="refit the global head on the sites' class statistics each "
                       "round (default), or not")
    local.add_argument("--seed", type=int, default=0)
    local.add_argument("--train-per-class", type=int, default=200,
                       help="training digits per class (of 400; default 200, for speed)")
    local.add_argument("--insecure", action="store_true",
                       help="no TLS, node authentication or CURVE (default: all three)")
    local.add_argument("--workdir", help="keep keys, logs and state here (default: a "
                       "temporary directory, removed at the end)")
    local.set_defaults(func=cmd_local)
    app = sub.add_parser("app", help="write edgecl's Flower App directory for `flwr run`")
    app.add_argument("directory", metavar="DIR")
    app.set_defaults(func=cmd_app)
    tls = sub.add_parser("tls", help="a private CA and a SuperLink certificate")
    tls.add_argument("directory", metavar="DIR")
    tls.add_argument("--host", action="append", required=True,
                     help="a name or IP the SuperNodes dial the SuperLink by (repeatable)")
    tls.set_defaults(func=cmd_tls)
    key = sub.add_parser("node-key", help="a SuperNode's key pair for node authentication")
    key.add_argument("directory", metavar="DIR")
    key.add_argument("--name", required=True, help="the site's name, e.g. barn-3")
    key.set_defaults(func=cmd_node_key)


def cmd_app(args: argparse.Namespace) -> int:
    from edgecl.federation.local import APP_DIR

    out = Path(args.directory)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(APP_DIR / "pyproject.toml", out / "pyproject.toml")
    print(f"wrote {out / 'pyproject.toml'}: edit [tool.flwr.app.config], then "
          f"flwr run {out} SUPERLINK --stream")
    return 0


def cmd_tls(args: argparse.Namespace) -> int:
    from edgecl.federation.credentials import make_tls

    files = make_tls(args.directory, args.host)
    print(f"wrote {files.ca_cert} (give it to every SuperNode and flwr CLI), "
          f"{files.server_cert} and {files.server_key} (the SuperLink's; keep the key there)")
    return 0


def cmd_node_key(args: argparse.Namespace) -> int:
    from edgecl.federation.credentials import make_node_key

    private, public = make_node_key(args.directory, args.name)
    print(f"wrote {private} (flower-supernode --auth-supernode-private-key) and {public} "
          f"(flwr supernode register {public} SUPERLINK)")
    return 0


def cmd_local(args: argparse.Namespace) -> int:
    from edgecl.extras import require_extras

    require_extras("edgecl federate local", "server", "data")  # it runs daemons on MNIST-5k
    from edgecl.federation.trial import run_trial, site_accuracy

    work = args.workdir or tempfile.mkdtemp(prefix="edgecl-federate-")
    try:
        trial = run_trial(work, args.sites, args.split, args.rounds, args.strategy, args.seed,
                          args.train_per_class, secure=not args.insecure,
                          calibration=args.calibration,
                          progress=lambda line: print(line, flush=True))
        print(f"\naccuracy of each site's newest snapshot on all ten digits "
              f"({args.strategy}, {args.split}):")
        names = [s.name for s in trial.streams]
        print("round  " + "  ".join(f"{n:>7s}" for n in names) + "     mean")
        for r in range(1, args.rounds + 1):
            acc = site_accuracy(trial.results, r)
            cells = [acc.get(n) for n in names]
            mean = sum(c for c in cells if c is not None) / max(1, sum(c is not None
                                                                     for c in cells))
            print(f"{r:5d}  " + "  ".join("      -" if c is None else f"{c:7.1%}"
                                         for c in cells) + f"  {mean:7.1%}")
        lost = {n: trial.received[n] - trial.learned[n] for n in names}
        print(f"acked and learned: " + ", ".join(f"{n} {trial.learned[n]}/{trial.received[n]}"
                                                  for n in names))
        return 0 if not any(lost.values()) else 1
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
