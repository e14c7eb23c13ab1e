"""`edgecl serve`: its flags (one per [serve] setting, a few for [input], [journal] and
[learner]), the settings they build (defaults < --config < --set < flags), and the run."""
from __future__ import annotations

import argparse
import dataclasses

from edgecl import config as config_mod
from edgecl.errors import UserError

# Flags for the [input] table; every [serve] key gets --KEY-WITH-DASHES.
INPUT_FLAGS = {"channels": "channels", "height": "height", "width": "width", "dtype": "dtype"}
# Shortcuts for the learner keys people change most; any other is --set learner.KEY=VALUE.
LEARNER_FLAGS = {"method": str, "buffer_size": int, "seed": int}
# Defaults whose value needs words (an empty string means "look it up at start").
DEFAULT_TEXT = {"state_dir": "$STATE_DIRECTORY if set, else ./state"}


def register(subparsers) -> None:
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
