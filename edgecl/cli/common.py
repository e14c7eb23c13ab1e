"""What several commands share: the CURVE flags of every client command."""
from __future__ import annotations

import argparse

from edgecl.security import SECRET_SUFFIX, ClientCurve, client_curve


def add_client_args(parser: argparse.ArgumentParser) -> None:
    """The flags every client command takes to talk to a CURVE daemon."""
    parser.add_argument("--curve-server-key", metavar="FILE",
                        help="the daemon's public key (server.key); turns CURVE on")
    parser.add_argument("--curve-key", metavar="FILE",
                        help=f"this client's key pair (NAME{SECRET_SUFFIX} from edgecl keygen)")


def client_curve_from_args(args: argparse.Namespace) -> ClientCurve | None:
    return client_curve(args.curve_server_key, args.curve_key)
