"""`edgecl pull`, `edgecl export`, `edgecl rollback`: argument parsing and printing only; the
work is in edgecl.export.device and the daemon's snapshot ops."""
from __future__ import annotations

import argparse
import json
import logging
import threading

from edgecl.errors import UserError
from edgecl.security import add_client_args, client_curve_from_args

log = logging.getLogger("edgecl.pull")

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pull", help="fetch the daemon's newest ONNX snapshot into a directory",
        description="Write DIR/model.onnx, DIR/model.int8.onnx and DIR/meta.json. Files are "
                    "checked against their sha256 and renamed into place only when all check "
                    "out; an interrupted pull resumes.")
    _common(p)
    p.add_argument("--out", required=True, metavar="DIR", help="directory to install into")
    p.add_argument("--int8-only", action="store_true", help="skip the fp32 model")
    p.add_argument("--watch", action="store_true",
                   help="keep running and install each new version as it is announced")
    p.add_argument("--wait-ms", type=int, default=0, metavar="MS",
                   help="without --watch: wait up to MS for a version newer than DIR's")
    p.set_defaults(func=cmd_pull)

    p = subparsers.add_parser(
        "export", help="ask a daemon to publish a snapshot now",
        description="The daemon exports after its next learning step, if it learned anything "
                    "since the last snapshot, and publishes it if the parity gate passes.")
    _common(p)
    p.add_argument("--wait-ms", type=int, default=30_000, metavar="MS",
                   help="wait up to MS for the new version (0: do not wait)")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser(
        "rollback", help="republish an older snapshot as the newest",
        description="Devices following the newest version pick the old model up as a new "
                    "version number; versions never go backwards.")
    _common(p)
    p.add_argument("--to", type=int, metavar="VERSION",
                   help="version to go back to (default: the one before the newest)")
    p.set_defaults(func=cmd_rollback)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="address", default=DEFAULT_ADDRESS, metavar="ADDR",
                   help=f"daemon address (default {DEFAULT_ADDRESS})")
    p.add_argument("--timeout", type=float, default=2.5, metavar="S")
    p.add_argument("--retries", type=int, default=2)
    add_client_args(p)


def _unavailable(exc) -> UserError:
    return UserError(str(exc))


def cmd_pull(args: argparse.Namespace) -> int:
    from edgecl.client import DaemonUnavailable, RequestRefused
    from edgecl.export.device import DeviceClient

    client = DeviceClient(args.address, args.out, int8_only=args.int8_only,
                          timeout=args.timeout, retries=args.retries,
                          curve=client_curve_from_args(args))
    if args.watch:
        print(f"watching {args.address} for snapshots; installing into {args.out} "
              "(Ctrl-C to stop)", flush=True)
        client.watch(on_update=lambda v: print(f"installed snapshot {v}", flush=True),
                     stop=threading.Event())
        return 0
    try:
        version = client.pull(wait_ms=args.wait_ms)
    except (DaemonUnavailable, RequestRefused) as exc:
        raise _unavailable(exc) from None
    local = client.local_version()
    if version is None:
        print(f"{args.out}: up to date at version {local}" if local is not None
              else f"{args.address} has published no snapshot yet")
        return 0 if local is not None else 1
    print(f"installed snapshot {version} in {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from edgecl.client import Connection, DaemonUnavailable, RequestRefused

    curve = client_curve_from_args(args)
    try:
        with Connection(args.address, args.timeout, args.retries, curve=curve) as conn:
            before = conn.request("snapshot.export").get("latest")
        if not args.wait_ms:
            print("export requested")
            return 0
        with Connection(args.address, args.timeout + args.wait_ms / 1000, args.retries,
                        curve=curve) as conn:
            info = conn.request("snapshot.info", since=before or 0, wait_ms=args.wait_ms)
    except (DaemonUnavailable, RequestRefused) as exc:
        raise _unavailable(exc) from None
    version = info.get("version")
    if version is None or version == before:
        print(f"no new snapshot within {args.wait_ms} ms (nothing new learned, or the parity "
              "gate rejected it: see `edgecl status`)")
        return 1
    held = info["meta"].get("heldout", {})
    print(json.dumps({"version": version, "samples_learned": info["meta"].get("samples_learned"),
                      "accuracy_fp32": held.get("accuracy_fp32"),
                      "accuracy_int8": held.get("accuracy_int8"),
                      "bytes": {n: f["bytes"] for n, f in info["meta"]["files"].items()}}))
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from edgecl.client import Connection, DaemonUnavailable, RequestRefused

    fields = {} if args.to is None else {"to": args.to}
    curve = client_curve_from_args(args)
    try:
        with Connection(args.address, args.timeout, args.retries, curve=curve) as conn:
            reply = conn.request("snapshot.rollback", **fields)
    except RequestRefused as exc:
        raise UserError(exc.message) from None
    except DaemonUnavailable as exc:
        raise _unavailable(exc) from None
    print(f"published version {reply['version']} (a copy of version {reply['source_version']})")
    return 0
