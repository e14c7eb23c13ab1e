"""`edgecl status`: a daemon's figures as a table (`format_status`, also what `edgecl demo`
prints), as JSON, or redrawn live with rates (`--watch`)."""
from __future__ import annotations

import argparse
import json
import sys
import time

from edgecl.cli.common import add_client_args, client_curve_from_args
from edgecl.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser("status", help="show what a daemon has learned",
                              description="Ask a running daemon for its figures.")
    p.add_argument("--from", dest="address", default="tcp://127.0.0.1:5555", metavar="ADDR",
                   help="daemon address (default tcp://127.0.0.1:5555)")
    p.add_argument("--json", action="store_true", help="machine-readable (schema in "
                                                       "docs/protocol.md)")
    p.add_argument("--timeout", type=float, default=2.5, metavar="S")
    p.add_argument("--retries", type=int, default=2)
    p.add_argument("--watch", action="store_true",
                   help="a live view, redrawn in place with rates, until Ctrl-C")
    p.add_argument("--interval", type=float, default=2.0, metavar="S",
                   help="seconds between redraws with --watch (default 2)")
    add_client_args(p)
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    from edgecl.client import DaemonUnavailable, get_status

    if args.watch:
        return watch_status(args)
    try:
        status = get_status(args.address, timeout=args.timeout, retries=args.retries,
                            curve=client_curve_from_args(args))
    except DaemonUnavailable as exc:
        raise UserError(str(exc)) from None
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        print(format_status(status, args.address))
    return 0


# ANSI: cursor home, clear to the end of the screen; a redraw replaces the last one in place.
REDRAW = "\x1b[H\x1b[J"
RATES = (("samples_received", "received/s"), ("samples_learned", "learned/s"),
         ("steps", "steps/s"), ("batches_received", "pushes/s"))


def watch_status(args: argparse.Namespace) -> int:
    """`status --watch`: the figures of `status` plus rates between redraws, until Ctrl-C. A
    daemon that stops answering is shown as such, and watched on."""
    from edgecl.client import DaemonUnavailable, get_status

    if args.interval <= 0:
        raise UserError(f"--interval must be positive, got {args.interval}")
    curve = client_curve_from_args(args)
    previous: tuple[float, dict] | None = None
    try:
        while True:
            now = time.monotonic()
            try:
                status = get_status(args.address, timeout=args.timeout, retries=args.retries,
                                    curve=curve)
                body = format_status(status, args.address,
                                     extra=[("rates", rates_text(previous, now, status))])
                previous = (now, status)
            except DaemonUnavailable as exc:
                body = f"{args.address}: {exc}"
            stamp = time.strftime("%H:%M:%S")
            sys.stdout.write(f"{REDRAW}edgecl status --watch  {stamp}  every "
                             f"{args.interval:g} s, Ctrl-C to stop\n\n{body}\n")
            sys.stdout.flush()
            time.sleep(max(0.0, args.interval - (time.monotonic() - now)))
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        return 0


def rates_text(previous: tuple[float, dict] | None, now: float, status: dict) -> str:
    """'12.0 received/s, ...' from two successive statuses (a restart counts as zero)."""
    if previous is None:
        return "(from the next redraw on)"
    then, before = previous
    elapsed = max(now - then, 1e-9)
    parts = []
    for key, name in RATES:
        delta = (status.get(key) or 0) - (before.get(key) or 0)
        parts.append(f"{max(delta, 0) / elapsed:.1f} {name}")
    return ", ".join(parts)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _snapshot_row(status: dict) -> str:
    """Newest version, the newest with an int8 model when that is an older one, and age."""
    version, int8 = status.get("snapshot_version"), status.get("snapshot_int8_version")
    if version is None:
        return "none yet"
    text = f"v{version}"
    if "snapshot_int8_version" in status and int8 != version:
        text += f" (fp32 alone; int8 devices keep {'none' if int8 is None else f'v{int8}'})"
    return text + _snapshot_age(status.get("snapshot_age"))


def _snapshot_age(age: dict | None) -> str:
    """Freshness: ack of a sample to the first published snapshot that learned it."""
    if not age:
        return ""
    return (f", sample to snapshot median {age['median_s']:.1f} s, p95 {age['p95_s']:.1f} s "
            f"(of which queued {age['queue_median_s']:.1f} / {age['queue_p95_s']:.1f} s; "
            f"last {age['samples']} samples)")


def format_status(status: dict, address: str = "", extra: list | tuple = ()) -> str:
    """A short table a person reads at a glance; `extra` (name, text) rows go last."""
    spec = status.get("input_spec")
    spec_text = (f"{spec['channels']}x{spec['height']}x{spec['width']} {spec['dtype']}"
                 if spec else "not fixed yet (first push decides)")
    refused = {k: v for k, v in status.get("refused", {}).items() if v}
    rows = [
        ("daemon", f"{address} edgecl {status.get('version')} protocol v{status.get('protocol')}"
                   f", up {status.get('uptime_s', 0):.0f} s"
                   + ("" if status.get("accepting", True) else ", shutting down")),
        ("input", spec_text),
        ("samples", f"{status['samples_received']} received, {status['samples_learned']} "
                    f"learned, {status['queue_depth']} queued"
                    + (f", {status['samples_duplicate']} duplicates"
                       if status.get("samples_duplicate") else "")),
        ("refused", ", ".join(f"{k} {v}" for k, v in sorted(refused.items())) or "none"),
        ("classes", f"{status['n_classes']}: "
                    + (", ".join(repr(c) for c in status["classes"]) or "-")),
        ("prequential", f"{_pct(status.get('prequential_acc'))} overall, "
                        f"{_pct(status.get('prequential_acc_window'))} recent"),
        ("buffer", f"{status.get('buffer_fill') or 0}/{status.get('buffer_capacity') or 0} "
                   f"samples, {(status.get('buffer_bytes') or 0) / 1024:.0f} KiB"),
        ("learner", f"{status.get('steps') or 0} steps, {status.get('steps_per_s') or 0:.1f} "
                    "steps/s"),
        ("snapshot", _snapshot_row(status)),
    ]
    checkpoint, journal = status.get("checkpoint"), status.get("journal")
    if checkpoint and journal:
        rows.append(("durability", f"checkpoint covers {checkpoint['covered']} samples, journal "
                                   f"{journal['segments']} segments "
                                   f"{journal['bytes'] / 1024:.0f} KiB, fsync {journal['fsync']}"
                     + (f", {checkpoint['replayed_samples']} replayed at start"
                        if checkpoint.get("replayed_samples") else "")))
        for error in (journal.get("error"), checkpoint.get("error")):
            if error:
                rows.append(("storage error", error))
    if status.get("curve") is not None:
        security = "no CURVE: unencrypted, open to anyone who reaches the port"
        if status["curve"]:
            security = f"CURVE, {status.get('curve_refused', 0)} unlisted keys refused"
            by_role = status.get("refused_by_role") or {}
            forbidden = ", ".join(f"{role} {n}" for role, n in by_role.items() if n)
            if forbidden:
                security += f"; forbidden by role: {forbidden}"
        rows.insert(1, ("security", security))
    if status.get("learner_error"):
        rows.append(("last error", status["learner_error"]))
    refused_snapshot = status.get("snapshot_last_failure")
    if refused_snapshot:
        what = "int8 model" if refused_snapshot.get("fp32_published") else "snapshot"
        rows.append(("last refused", f"{what} at {refused_snapshot.get('samples_learned')} "
                                     f"samples: {'; '.join(refused_snapshot.get('failures') or [])}"
                                     f" ({status.get('snapshots_rejected', 0)} refused, "
                                     f"{status.get('snapshots_int8_withheld', 0)} published as "
                                     "fp32 alone this run)"))
    per_class = status.get("per_class_acc") or []
    if per_class:
        rows.append(("per class", "  ".join(f"{e['label']!r}: {_pct(e['acc'])}"
                                            for e in per_class)))
    rows.extend(extra)
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
