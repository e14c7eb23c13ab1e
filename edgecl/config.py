"""One dataclass tree for the daemon's settings: defaults live here and only here.

TOML in (`--config edgecl.toml`), flags on top, and every error names the offending key, e.g.
`serve.queue_mb: expected a number, got "big"`. The `[learner]` table is handed to
`edgecl.learn.LearnerConfig` as keyword arguments; its keys are checked against that class.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

from edgecl.errors import UserError
from edgecl.wire import DTYPES, InputSpec


OVERLOAD_POLICIES = ("realtime", "backpressure")
FSYNC_POLICIES = ("batch", "interval")  # journal.fsync (edgecl.serve.journal applies them)


@dataclass
class ServeConfig:
    """Sockets, queue and flow control of `edgecl serve`."""

    port: int = 5555                 # ROUTER for requests; PUB for announcements is port + 1
    bind: str = "0.0.0.0"            # interface address to bind; "127.0.0.1" keeps it local
    state_dir: str = ""              # journal, checkpoints, snapshots, input spec. Unset:
                                     # $STATE_DIRECTORY (systemd) if set, else ./state
    metrics_port: int = 0            # Prometheus /metrics on this port; 0 = off
    metrics_bind: str = "127.0.0.1"  # address /metrics listens on: plain HTTP, no auth, so
                                     # this box only unless an address is given
    overload: str = "backpressure"   # when sensors push faster than the learner learns:
                                     # 'backpressure' answers `busy` once max_lag_s of
                                     # learning is queued, sensors admitted in turn;
                                     # 'realtime' acks every push at once and trains on what
                                     # it has time for, offering the rest to the replay buffer
                                     # only (docs/overload.md)
    max_lag_s: float = 2.0           # the most seconds of learning left waiting in the queue
    queue_mb: float = 64.0           # bound on accepted-but-unlearned samples, in MiB
    credit_window: int = 8           # most pushes one client may have unacknowledged
    max_batch: int = 4096            # most samples in one push
    max_push_mb: float = 16.0        # most payload bytes in one push, in MiB
    retry_after_ms: int = 100        # how long a client waits after `busy`
    learn_batch: int = 10            # samples per learner step; pushes are merged or split.
                                     # 10 is what the learner is tuned for: on Split-MNIST,
                                     # 32 gave 59 % against 91 % (a third as many steps)
    dedup_window: int = 1024         # recent sequence numbers remembered per sensor
    stats_interval_s: float = 0.25   # how often the learner thread publishes its stats
    # Limits on what one request may carry (docs/protocol.md, "Limits"). Checked before
    # anything is allocated, so a hostile or broken client costs a refusal, not memory.
    max_header_bytes: int = 2 * 2**20  # largest header frame (a msgpack map); more: too_large
    max_header_depth: int = 8        # deepest nesting of maps/arrays in a header
    max_label_chars: int = 256       # longest string label
    max_classes: int = 1000          # most distinct labels; a push adding more: too_many_classes
    # CURVE (docs/security.md): encryption, and only listed clients get in. Both or neither.
    curve_secret: str = ""           # the daemon's key pair file (`edgecl keygen`: *.key_secret)
    allow_clients: str = ""          # directory of admitted clients' public keys (*.key),
                                     # each with every role (a warning says so)
    allow_sensors: str = ""          # directory of keys that may push only
    allow_devices: str = ""          # ... that may pull snapshots and hear announcements
    allow_admins: str = ""           # ... that may export, roll back and read status
    allow_federation: str = ""       # ... that may read the model and merge a global one in
                                     # (model.get, model.merge: a Flower client)
    require_curve: bool = False      # refuse to start without curve_secret and allow_clients

    def check(self) -> None:
        if not 0 <= self.port <= 65534:
            raise UserError(f"serve.port: {self.port} is not a port (0..65534; port + 1 is "
                            "used for announcements)")
        if not 0 <= self.metrics_port <= 65535:
            raise UserError(f"serve.metrics_port: {self.metrics_port} is not a port")
        if self.overload not in OVERLOAD_POLICIES:
            raise UserError(f"serve.overload: {self.overload!r} is not one of "
                            f"{', '.join(OVERLOAD_POLICIES)}")
        for key in ("max_lag_s", "queue_mb", "credit_window", "max_batch", "max_push_mb", "learn_batch",
                    "dedup_window",
                    "stats_interval_s",
                    "max_header_bytes", "max_header_depth", "max_label_chars", "max_classes"):
            if getattr(self, key) <= 0:
                raise UserError(f"serve.{key}: must be positive, got {getattr(self, key)}")
        if self.retry_after_ms < 0:
            raise UserError(f"serve.retry_after_ms: must be >= 0, got {self.retry_after_ms}")
        for key in ("bind", "metrics_bind"):
            if not getattr(self, key):
                raise UserError(f"serve.{key}: must be an address such as 0.0.0.0 or "
                                "127.0.0.1")
        key_dirs = (self.allow_clients, self.allow_sensors, self.allow_devices,
                    self.allow_admins, self.allow_federation)
        if bool(self.curve_secret) != any(key_dirs):
            raise UserError("serve.curve_secret and the client key directories go together: "
                            "give --curve-secret KEYFILE with --allow-clients DIR (every role) "
                            "or --allow-sensors / --allow-devices / --allow-admins / "
                            "--allow-federation, or none")
        if self.require_curve and not self.curve_secret:
            raise UserError("serve.require_curve is set but CURVE is not configured: give "
                            "--curve-secret KEYFILE --allow-clients DIR (see `edgecl keygen`)")

    @property
    def queue_bytes(self) -> int:
        return int(self.queue_mb * 2**20)

    @property
    def max_push_bytes(self) -> int:
        return int(self.max_push_mb * 2**20)


@dataclass
class InputConfig:
    """The sample spec. Unset: taken from the first accepted push, then enforced."""

    channels: int | None = None
    height: int | None = None
    width: int | None = None
    dtype: str | None = None

    def check(self) -> None:
        dims = (self.channels, self.height, self.width)
        if any(d is not None for d in dims) and not all(d is not None for d in dims):
            raise UserError("input: give all of channels, height and width, or none of them")
        for key, value in zip(("channels", "height", "width"), dims):
            if value is not None and value <= 0:
                raise UserError(f"input.{key}: must be positive, got {value}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise UserError(f"input.dtype: {self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.dtype is not None and self.channels is None:
            raise UserError("input.dtype: also give input.channels, height and width")

    def spec(self) -> InputSpec | None:
        if self.channels is None:
            return None
        return InputSpec(self.channels, self.height, self.width, self.dtype or "uint8")


@dataclass
class SnapshotConfig:
    """ONNX snapshots for devices (edgecl.export.service): triggers, retention, the gate."""

    enabled: bool = True
    every_samples: int = 1000          # export after this many newly learned samples; 0 = off
    every_s: float = 5.0               # and/or this many seconds after the last export
                                       # ended (at least as long as it took); 0 = off
    keep: int = 5                      # versions kept for rollback
    heldout_every: int = 20            # 1 in N samples per class is held out, never learned
    heldout_per_class: int = 20        # held-out reservoir size per class
    chunk_bytes: int = 256 * 1024      # largest snapshot.chunk reply
    credit: int = 4                    # chunk requests a device may have in flight
    gate_max_abs_logit: float = 1e-3   # fp32 ONNX vs torch
    gate_min_int8_agreement: float = 0.98  # int8 vs fp32 top-1, fraction
    gate_max_accuracy_drop: float = 0.01   # fp32 - int8 held-out accuracy, fraction
    gate_alpha: float = 0.05           # int8 checks reject only if significant at this level
    publish_fp32_alone: bool = True    # when only int8's checks fail, publish fp32 without
                                       # int8 (int8 devices keep their last int8 model)

    def check(self) -> None:
        for key in ("every_samples", "every_s"):
            if getattr(self, key) < 0:
                raise UserError(f"snapshots.{key}: must be >= 0, got {getattr(self, key)}")
        for key in ("keep", "chunk_bytes", "credit", "heldout_per_class"):
            if getattr(self, key) < 1:
                raise UserError(f"snapshots.{key}: must be at least 1, got {getattr(self, key)}")
        if not 0.0 < self.gate_alpha < 1.0:
            raise UserError(f"snapshots.gate_alpha: a significance level between 0 and 1 "
                            f"(exclusive), got {self.gate_alpha}")
        if self.heldout_every < 2:
            raise UserError(f"snapshots.heldout_every: must be at least 2, got "
                            f"{self.heldout_every}")


@dataclass
class JournalConfig:
    """The write-ahead journal (docs/durability.md): what an ack promises after a crash."""

    fsync: str = "batch"               # "batch": fsync before each ack; "interval": every
                                       # fsync_interval_ms (a power cut may lose acks of that window)
    fsync_interval_ms: int = 50
    segment_mb: float = 8.0            # a new segment file after this many MiB

    def check(self) -> None:
        if self.fsync not in FSYNC_POLICIES:
            raise UserError(f"journal.fsync: {self.fsync!r} is not one of "
                            f"{', '.join(FSYNC_POLICIES)}")
        for key in ("fsync_interval_ms", "segment_mb"):
            if getattr(self, key) <= 0:
                raise UserError(f"journal.{key}: must be positive, got {getattr(self, key)}")

    @property
    def segment_bytes(self) -> int:
        return int(self.segment_mb * 2**20)


@dataclass
class CheckpointConfig:
    """When the learner's whole state is checkpointed (and at shutdown); the last two are kept."""

    every_steps: int = 500             # learner steps between checkpoints; 0 = off
    every_s: float = 60.0              # and/or seconds between checkpoints; 0 = off

    def check(self) -> None:
        for key in ("every_steps", "every_s"):
            if getattr(self, key) < 0:
                raise UserError(f"checkpoints.{key}: must be >= 0, got {getattr(self, key)}")


BN_MODES = ("global", "local", "refresh")  # federation.bn (edgecl.learn.merge applies them)


@dataclass
class FederationConfig:
    """Merging a global model into this daemon's learner (model.merge; docs/learning.md)."""

    bn: str = "global"                 # BatchNorm running statistics at a merge: "global"
                                       # takes the merged model's, "local" keeps this site's,
                                       # "refresh" re-estimates them from the replay buffer

    def check(self) -> None:
        if self.bn not in BN_MODES:
            raise UserError(f"federation.bn: {self.bn!r} is not one of {', '.join(BN_MODES)}")


def resolve_state_dir(configured: str) -> str:
    """The state directory: as configured, else systemd's $STATE_DIRECTORY (the first, if
    StateDirectory= names several), else ./state."""
    return configured or os.environ.get("STATE_DIRECTORY", "").split(":")[0] or "state"


@dataclass
class Config:
    serve: ServeConfig = field(default_factory=ServeConfig)
    input: InputConfig = field(default_factory=InputConfig)
    snapshots: SnapshotConfig = field(default_factory=SnapshotConfig)
    journal: JournalConfig = field(default_factory=JournalConfig)
    checkpoints: CheckpointConfig = field(default_factory=CheckpointConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    # Keyword arguments for edgecl.learn.LearnerConfig; checked in learner_config().
    learner: dict = field(default_factory=dict)

    def check(self) -> None:
        self.serve.check()
        self.input.check()
        self.snapshots.check()
        self.journal.check()
        self.checkpoints.check()
        self.federation.check()

    def learner_config(self, validate: bool = True):
        """Build the LearnerConfig; an unknown or ill-typed key is a UserError naming it.
        `validate=False` checks the keys only, without importing torch (a daemon does that
        before it binds; the learner thread validates the rest)."""
        from edgecl.learn import LearnerConfig  # its settings module: no torch

        known = {f.name: f for f in dataclasses.fields(LearnerConfig)}
        for key in self.learner:
            if key not in known:
                raise UserError(f"learner.{key}: unknown key; known keys: "
                                f"{', '.join(sorted(known))}")
        try:
            learner_config = LearnerConfig(**self.learner)
            if validate:
                learner_config.validate()
        except (TypeError, ValueError) as exc:
            raise UserError(f"learner.{exc}" if str(exc).split(":")[0] in known
                            else f"learner: {exc}") from None
        return learner_config


SECTIONS = {"serve": ServeConfig, "input": InputConfig, "snapshots": SnapshotConfig,
            "journal": JournalConfig, "checkpoints": CheckpointConfig,
            "federation": FederationConfig}


def _type_ok(value: Any, annotation: Any) -> bool:
    """True if a TOML value fits a field annotation (int | None, float, str ...)."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) \
        else (annotation,)
    for option in options:
        if option is type(None) and value is None:
            return True
        if option is bool and isinstance(value, bool):
            return True
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if option is str and isinstance(value, str):
            return True
    return False


def field_types(cls) -> dict:
    """Each field of a settings dataclass and its annotation (`int | None`, `float`...), for
    type checks here and for building command-line flags."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def apply(config: Config, section: str, key: str, value: Any, source: str) -> None:
    """Set one key, checking it exists and has the right type; `source` goes in the error."""
    if section == "learner":
        config.learner[key] = value
        return
    if section not in SECTIONS:
        raise UserError(f"{source}: unknown section [{section}]; known: "
                        f"{', '.join(list(SECTIONS) + ['learner'])}")
    types_ = field_types(SECTIONS[section])
    if key not in types_:
        raise UserError(f"{source}: {section}.{key} is not a setting; known: "
                        f"{', '.join(types_)}")
    annotation = types_[key]
    if not _type_ok(value, annotation):
        name = getattr(annotation, "__name__", str(annotation))
        raise UserError(f"{source}: {section}.{key}: expected {name}, got {value!r}")
    if annotation is float and isinstance(value, int):
        value = float(value)
    setattr(getattr(config, section), key, value)


def load(path: str | Path | None) -> Config:
    """Read a TOML file into a Config; None gives the defaults."""
    config = Config()
    if path is None:
        return config
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config file {path} is not valid TOML: {exc}") from None
    for section, table in data.items():
        if not isinstance(table, dict):
            raise UserError(f"{path}: top-level key '{section}' must be a [table]")
        for key, value in table.items():
            apply(config, section, key, value, str(path))
    return config


def parse_assignment(text: str) -> tuple[str, str, Any]:
    """`learner.buffer_size=200` -> ("learner", "buffer_size", 200); the value is TOML syntax,
    and a bare word that is not valid TOML is taken as a string (method=derpp)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise UserError(f"--set {text!r}: expected SECTION.KEY=VALUE, e.g. learner.buffer_size=200")
    dotted, raw = text.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    try:
        value = tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw
    return section, key.strip(), value
