"""`edgecl serve`, `edgecl push`, `edgecl status`: argument parsing and printing only; the work
is in edgecl.serve.daemon and edgecl.client."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time

from edgecl import config as config_mod
from edgecl.errors import UserError
from edgecl.security import add_client_args, client_curve_from_args

log = logging.getLogger("edgecl.serve")

# Flags for the [input] table; every [serve] key gets --KEY-WITH-DASHES.
INPUT_FLAGS = {"channels": "channels", "height": "height", "width": "width", "dtype": "dtype"}
# Shortcuts for the learner keys people change most; any other is --set learner.KEY=VALUE.
LEARNER_FLAGS = {"method": str, "buffer_size": int, "seed": int}
# Defaults whose value needs words (an empty string means "look it up at start").
DEFAULT_TEXT = {"state_dir": "$STATE_DIRECTORY if set, else ./state"}


def register(subparsers) -> None:
    _register_serve(subparsers)
    _register_push(subparsers)
    _register_status(subparsers)


# ---------------------------------------------------------------------------- serve

def _register_serve(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="run the daemon in the foreground",
        description="Learn online from samples pushed over ZeroMQ. Settings come from defaults, "
                    "then --config, then --set, then the flags below. Stop with Ctrl-C or "
                    "SIGTERM: queued samples are learned before exit.")
    p.add_argument("--config", metavar="TOML", help="settings file ([serve], [input], [learner], "
                                                    "[snapshots], [journal], [checkpoints])")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="any setting, e.g. --set learner.lr=0.01 (repeatable)")
    hints = config_mod.field_types(config_mod.ServeConfig)
    for f in dataclasses.fields(config_mod.ServeConfig):
        if hints[f.name] is bool:  # a switch: --require-curve
            p.add_argument(f"--{f.name.replace('_', '-')}", dest=f"serve__{f.name}",
                           action="store_true", default=None, help=f"serve.{f.name}")
            continue
        kind = _scalar(hints[f.name])
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f"serve__{f.name}", type=kind,
                       default=None, metavar=f.name.upper(),
                       help=f"serve.{f.name} (default {DEFAULT_TEXT.get(f.name, f.default)})")
    input_hints = config_mod.field_types(config_mod.InputConfig)
    for key, flag in INPUT_FLAGS.items():
        p.add_argument(f"--{flag}", dest=f"input__{key}", type=_scalar(input_hints[key]),
                       default=None, metavar=key.upper(),
                       help=f"input.{key} (default: from the first push)")
    p.add_argument("--fsync", dest="journal__fsync", choices=config_mod.FSYNC_POLICIES,
                   default=None,
                   help="journal.fsync: 'batch' syncs the journal before every ack (default); "
                        "'interval' every journal.fsync_interval_ms, faster, and a power cut "
                        "can lose the acks of that window (docs/durability.md)")
    for key, kind in LEARNER_FLAGS.items():
        p.add_argument(f"--{key.replace('_', '-')}", dest=f"learner__{key}", type=kind,
                       default=None, metavar=key.upper(),
                       help=f"learner.{key}")
    p.set_defaults(func=cmd_serve)


def _scalar(annotation) -> type:
    """The argparse type for `int | None`, `float`, `str` annotations."""
    for kind in (int, float, str):
        if annotation is kind or kind in getattr(annotation, "__args__", ()):
            return kind
    return str


def build_config(args: argparse.Namespace) -> config_mod.Config:
    """Defaults < --config TOML < --set < explicit flags."""
    config = config_mod.load(args.config)
    for text in args.set:
        section, key, value = config_mod.parse_assignment(text)
        config_mod.apply(config, section, key, value, f"--set {text}")
    for dest, value in vars(args).items():
        if "__" in dest and value is not None:
            section, key = dest.split("__", 1)
            config_mod.apply(config, section, key, value, f"--{key.replace('_', '-')}")
    config.check()
    return config


def cmd_serve(args: argparse.Namespace) -> int:
    from edgecl.serve.daemon import Daemon

    daemon = Daemon(build_config(args))
    code = daemon.serve()
    if daemon.load_error is not None:  # found by the learner thread, after the bind
        raise UserError(daemon.load_error)
    return code


# ---------------------------------------------------------------------------- push

def _register_push(subparsers) -> None:
    p = subparsers.add_parser(
        "push", help="stream a data set to a daemon",
        description="Push labeled samples: SOURCE is 'mnist5k' (bundled digits, "
                    "class-incremental order), an .npz file with x and y, or an image folder "
                    "with one sub-folder per label.")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--to", default="tcp://127.0.0.1:5555", metavar="ADDR",
                   help="daemon address (default tcp://127.0.0.1:5555)")
    p.add_argument("--batch", type=int, default=64, help="samples per push (default 64)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="push only N samples")
    p.add_argument("--rate", type=float, default=None, metavar="HZ",
                   help="at most HZ samples per second (default: as fast as acked)")
    p.add_argument("--sensor", default=None, metavar="NAME",
                   help="sensor name (default HOST-PID)")
    p.add_argument("--timeout", type=float, default=2.5, metavar="S",
                   help="seconds to wait for an ack before resending (default 2.5)")
    p.add_argument("--retries", type=int, default=3, help="resends before giving up (default 3)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_client_args(p)
    p.set_defaults(func=cmd_push)


def cmd_push(args: argparse.Namespace) -> int:
    from edgecl.client import DaemonUnavailable, PushRefused, SensorClient, iter_batches
    from edgecl.data import load_source

    if args.batch < 1:
        raise UserError(f"--batch must be at least 1, got {args.batch}")
    if args.rate is not None and args.rate <= 0:
        raise UserError(f"--rate must be positive, got {args.rate}")
    if args.limit is not None and args.limit < 0:
        raise UserError(f"--limit must be >= 0, got {args.limit}")
    curve = client_curve_from_args(args)
    x, labels = load_source(args.source)
    if args.limit is not None:
        x, labels = x[:args.limit], labels[:args.limit]
    total = len(labels)

    from tqdm import tqdm
    bar = tqdm(total=total, unit="sample", desc=f"push {args.source}", file=sys.stderr,
               disable=args.no_progress, dynamic_ncols=True)
    client = SensorClient(args.to, sensor=args.sensor, timeout=args.timeout,
                          retries=args.retries, curve=curve)
    started = time.monotonic()
    failure: Exception | None = None
    try:
        for xb, yb in iter_batches(x, labels, args.batch):
            if args.rate:
                lag = started + client.stats.samples / args.rate - time.monotonic()
                if lag > 0:
                    time.sleep(lag)
            client.push(xb, yb)
            bar.update(client.stats.acked_samples - bar.n)
        client.flush()
        bar.update(client.stats.acked_samples - bar.n)
    except (PushRefused, DaemonUnavailable) as exc:
        failure = exc
    finally:
        bar.close()
        client.close(flush=False)
    elapsed = time.monotonic() - started
    s = client.stats
    print(f"pushed {s.samples} samples in {s.pushes} batches to {args.to} as "
          f"{client.sensor!r} in {elapsed:.1f} s: acked {s.acked_samples}, "
          f"retried {s.retried}, busy {s.busy}, refused {s.refused}"
          + (f", duplicates {s.duplicates}" if s.duplicates else ""))
    if failure is not None:
        raise UserError(str(failure))
    return 0


# ---------------------------------------------------------------------------- status

def _register_status(subparsers) -> None:
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
        ("snapshot", "none yet" if status.get("snapshot_version") is None
         else f"v{status['snapshot_version']}" + _snapshot_age(status.get("snapshot_age"))),
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
        rows.append(("last refused", f"snapshot at {refused_snapshot.get('samples_learned')} "
                                     f"samples: {'; '.join(refused_snapshot.get('failures') or [])}"))
    per_class = status.get("per_class_acc") or []
    if per_class:
        rows.append(("per class", "  ".join(f"{e['label']!r}: {_pct(e['acc'])}"
                                            for e in per_class)))
    rows.extend(extra)
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
