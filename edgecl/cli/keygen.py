"""`edgecl keygen`: write a CURVE key pair for the daemon or a client (the work is
edgecl.security.keygen)."""
from __future__ import annotations

import argparse

from edgecl.security import SERVER_NAME, keygen


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "keygen", help="write a CURVE key pair for the daemon or a client",
        description="Write DIR/NAME.key (public: hand it to the other side) and "
                    "DIR/NAME.key_secret (secret, mode 0600: keep it where it was made). "
                    "The daemon uses server.key_secret with --curve-secret and admits the "
                    "clients whose .key files are in its key directories; the directory a "
                    "client's .key is copied into (--allow-sensors, --allow-devices, "
                    "--allow-admins, --allow-federation) gives it its role.")
    p.add_argument("directory", metavar="DIR")
    p.add_argument("--name", default=SERVER_NAME,
                   help=f"key pair name, e.g. a sensor's (default {SERVER_NAME!r})")
    p.add_argument("--force", action="store_true", help="replace an existing pair")
    p.set_defaults(func=cmd_keygen)


def cmd_keygen(args: argparse.Namespace) -> int:
    public, secret = keygen(args.directory, args.name, args.force)
    print(f"wrote {public} (public) and {secret} (secret, keep it private)")
    if args.name == SERVER_NAME:
        print(f"daemon: edgecl serve --curve-secret {secret} --allow-clients DIR; "
              f"give {public} to every client (--curve-server-key)")
    else:
        print(f"client: --curve-key {secret}; copy {public} into the daemon's directory "
              "for this client's role: --allow-sensors, --allow-devices, --allow-admins or "
              "--allow-federation (--allow-clients: every role)")
    return 0
