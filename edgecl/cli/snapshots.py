"""`edgecl pull`, `edgecl export`, `edgecl rollback`: the snapshot commands. Argument parsing
and printing only; the work is in edgecl.client (DeviceClient, Connection) and the daemon's
snapshot ops."""
from __future__ import annotations

import argparse
import json
import logging
import threading

from edgecl.cli.common import add_client_args, client_curve_from_args
from edgecl.errors import UserError

log = logging.getLogger("edgecl.pull")

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"

# `edgecl export` exit codes, one per outcome (2 stays "usage or connection error", as for
# every edgecl command).
EXPORT_EXIT = {"published": 0, "failed": 1, "nothing_new": 3, "rejected": 4, "timed_out": 5}
EXPORT_EPILOG = """exit status:
  0  published: a new version passed the parity gate (printed with the gate's figures)
  1  the export itself failed (see the daemon's log)
  2  usage error, or the daemon did not answer
  3  nothing new learned since the last export: nothing to publish
  4  rejected by the parity gate: the reason and figures are printed; devices keep the
     previous version
  5  timed out: no outcome within --wait-ms (the export is queued or still running)"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pull", help="fetch the daemon's newest ONNX snapshot into a directory",
        description="Write DIR/model.onnx, DIR/model.int8.onnx and DIR/meta.json. Files are "
                    "checked against their sha256 and renamed into place only when all check "
                    "out; an interrupted pull resumes.")
    _common(p)
    p.add_argument("--out", required=True, metavar="DIR", help="directory to install into")
    p.add_argument("--int8-only", action="store_true",
                   help="install only the int8 model, from the newest version that has one")
    p.add_argument("--watch", action="store_true",
                   help="keep running and install each new version as it is announced")
    p.add_argument("--wait-ms", type=int, default=0, metavar="MS",
                   help="without --watch: wait up to MS for a version newer than DIR's")
    p.set_defaults(func=cmd_pull)

    p = subparsers.add_parser(
        "export", help="ask a daemon to publish a snapshot now",
        description="The daemon exports after its next learning step, if it learned anything "
                    "since the last snapshot, and publishes it if the parity gate passes. "
                    "Prints what happened and the gate's figures.",
        epilog=EXPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    p.add_argument("--wait-ms", type=int, default=60_000, metavar="MS",
                   help="wait up to MS for the outcome (0: only ask, do not wait)")
    p.add_argument("--json", action="store_true", help="print the outcome as one JSON object")
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
    from edgecl.client import DaemonUnavailable, DeviceClient, RequestRefused

    client = DeviceClient(args.address, args.out, int8_only=args.int8_only,
                          timeout=args.timeout, retries=args.retries,
                          curve=client_curve_from_args(args))
    if args.watch:
        print(f"watching {args.address} for snapshots; installing into {args.out} "
              "(Ctrl-C to stop)", flush=True)
        client.watch(on_update=lambda v: print(f"installed snapshot {v}", flush=True),
                     stop=threading.Event(), on_reject=lambda note: print(
                         rejection_line(note, client.local_version()), flush=True))
        return 0
    try:
        version = client.pull(wait_ms=args.wait_ms)
    except (DaemonUnavailable, RequestRefused) as exc:
        raise _unavailable(exc) from None
    local = client.local_version()
    if version is None:
        kind = "int8 " if args.int8_only else ""
        print(f"{args.out}: up to date at version {local}" if local is not None
              else f"{args.address} has published no {kind}snapshot yet")
        return 0 if local is not None else 1
    print(f"installed snapshot {version} in {args.out}")
    return 0


def rejection_line(note: dict, installed: int | None) -> str:
    """`pull --watch`'s line for a `snapshot.rejected` announcement."""
    reasons = "; ".join(note.get("failures") or ["no reason given"])
    return (f"snapshot at {note.get('samples_learned')} samples rejected by the parity gate, "
            f"keeping version {installed}: {reasons}")


def cmd_export(args: argparse.Namespace) -> int:
    from edgecl.client import Connection, DaemonUnavailable, RequestRefused

    if args.wait_ms < 0:
        raise UserError(f"--wait-ms {args.wait_ms}: expected milliseconds >= 0")
    curve = client_curve_from_args(args)
    try:
        with Connection(args.address, args.timeout + args.wait_ms / 1000, args.retries,
                        curve=curve) as conn:
            reply = conn.request("snapshot.export", wait_ms=args.wait_ms)
    except (DaemonUnavailable, RequestRefused) as exc:
        raise _unavailable(exc) from None
    outcome = reply.get("outcome")
    if outcome is None:  # --wait-ms 0, or a daemon that does not report outcomes
        print(f"export requested (newest version: {reply.get('latest')})")
        return 0
    if args.json:
        print(json.dumps(export_summary(reply)))
    else:
        print("\n".join(describe_export(reply, args.wait_ms)))
    return EXPORT_EXIT.get(outcome, 1)


def export_summary(reply: dict) -> dict:
    """The outcome as one flat JSON object (`edgecl export --json`)."""
    parity = reply.get("parity") or {}
    return {"outcome": reply["outcome"], "version": reply.get("version"),
            "latest": reply.get("latest"), "samples_learned": reply.get("samples_learned"),
            "accuracy_fp32": parity.get("accuracy_fp32"),
            "accuracy_int8": parity.get("accuracy_int8"), "bytes": reply.get("bytes"),
            "failures": parity.get("failures", []), "checks": parity.get("checks", {}),
            "int8_published": (reply.get("int8") or {}).get("published"),
            "message": reply.get("message")}


def describe_export(reply: dict, wait_ms: int) -> list[str]:
    """What `edgecl export` prints: one headline, then the gate's checks."""
    outcome, n = reply["outcome"], reply.get("samples_learned")
    if outcome == "published":
        sizes = ", ".join(f"{name} {size:,} B" for name, size in (reply.get("bytes") or {}).items())
        headline = f"published snapshot {reply['version']} ({n:,} samples learned; {sizes})"
        if (reply.get("int8") or {}).get("published") is False:
            return [headline, "fp32 alone: the int8 model failed the parity gate and was held "
                    "back (int8 devices keep the newest version that has one):",
                    *gate_lines(reply.get("parity") or {})]
        return [headline, "parity gate passed:", *gate_lines(reply.get("parity") or {})]
    if outcome == "rejected":
        return [f"rejected by the parity gate at {n:,} samples learned; devices keep version "
                f"{reply.get('latest')}:", *gate_lines(reply.get("parity") or {})]
    if outcome == "nothing_new":
        return [f"nothing new learned since the last export at "
                f"{reply.get('samples_at_last_export'):,} samples; newest version "
                f"{reply.get('latest')}"]
    if outcome == "failed":
        return [f"the export at {n:,} samples failed: {reply.get('message')} "
                "(see the daemon's log)"]
    return [f"no outcome within {wait_ms} ms: the export is queued or still running "
            "(`edgecl status` shows the newest version and the last rejection)"]


def gate_lines(parity: dict) -> list[str]:
    """Each check's verdict and figures, failures first."""
    lines = [f"  REJECTED {f}" for f in parity.get("failures", [])]
    for name in ("accuracy", "agreement"):
        check = (parity.get("checks") or {}).get(name)
        if check and check.get("verdict") == "pass":
            lines.append(f"  passed {check['reason']}")
    conversion_failed = any(f.startswith("fp32 ONNX vs torch") for f in parity.get("failures", []))
    if "max_abs_logit_diff" in parity and not conversion_failed:
        lines.append(f"  passed fp32 ONNX vs torch: max |dlogit| "
                     f"{parity['max_abs_logit_diff']:.1e}, top-1 identical on "
                     f"{parity.get('n_torch')} samples")
    lines += [f"  skipped {s}" for s in parity.get("skipped", [])]
    return lines


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
