"""`edgecl push`: stream a data set (mnist5k, an .npz, an image folder) to a daemon through
a SensorClient, with a progress bar and a one-line summary."""
from __future__ import annotations

import argparse
import sys
import time

from edgecl.cli.common import add_client_args, client_curve_from_args
from edgecl.errors import UserError


def register(subparsers) -> None:
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
