"""`edgecl <command>`: the command line. All argument parsing lives in this package, one module
per command group, each with `register(subparsers)`; the work is in the modules they call.
`edgecl bench` is the exception: its flags stay with the benchmarks in edgecl/bench.py.

Commands that need an extra (COMMAND_EXTRAS) import it only when run, so `edgecl --help`,
push, status, pull and keygen work in the lean install."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from edgecl import __version__
from edgecl.errors import UserError
from edgecl.extras import require_extras

# Each module has `register(subparsers)`, adding parsers whose defaults set `func(args) -> int`.
COMMAND_MODULES = [
    "edgecl.bench",            # bench split-mnist, bench realtime
    "edgecl.cli.demo",
    "edgecl.cli.serve",
    "edgecl.cli.push",
    "edgecl.cli.status",
    "edgecl.cli.snapshots",    # pull, export, rollback
    "edgecl.cli.methods",
    "edgecl.cli.keygen",
    "edgecl.cli.report",
    "edgecl.cli.federate",     # federate local, app, tls, node-key
]

# Commands that need more than the lean client install, and the extras they need: without
# them the command is a one-line error naming `pip install 'edgecl[...]'`.
COMMAND_EXTRAS = {
    "serve": ("server",),
    "demo": ("server", "data"),
    "bench": ("server", "data"),
    "methods": ("server",),
    "report": ("plot",),
    "federate": ("federation",),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgecl", description="Online continual learning for edge devices.")
    parser.add_argument("--version", action="version", version=f"edgecl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        require_extras(f"edgecl {args.command}", *COMMAND_EXTRAS.get(args.command, ()))
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"edgecl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgecl: interrupted", file=sys.stderr)
        return 130
