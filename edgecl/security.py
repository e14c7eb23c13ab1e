"""CURVE keys: making them (`keygen`, the work of `edgecl keygen`), and loading key files for
the daemon and its clients.

ZeroMQ's CURVE encrypts every frame; with a ZAP handler (pyzmq's `zmq.auth`) the daemon also
admits only clients whose public key it lists. Both the request (ROUTER) and announcement (PUB)
sockets are CURVE servers, so a stranger can neither push nor pull nor listen. What this does
and does not protect is in docs/security.md.

Key files are pyzmq's (czmq's) certificate format, written by `edgecl keygen DIR --name NAME`:
    DIR/NAME.key          the public key: give it to the other side
    DIR/NAME.key_secret   public + secret key, mode 0600: never leaves this machine
Every mistake with a key file is a one-line UserError, never a traceback or a silent
"admit nobody".
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

from edgecl.errors import UserError
from edgecl.wire import ErrorCode, WireError

log = logging.getLogger("edgecl.security")

SERVER_NAME = "server"
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_LOGGED_STRANGERS = 100  # distinct refused keys logged; beyond that only counted

# Roles (docs/security.md): what a client key may ask for. A key listed in several role
# directories has every role it is listed for; `serve.allow_clients` gives them all.
ROLES = ("sensor", "device", "admin", "federation")
# op -> the roles that may ask for it (any one of them suffices)
OP_ROLES = {"push": ("sensor",),
            "snapshot.info": ("device",), "snapshot.chunk": ("device",),
            "snapshot.export": ("admin",), "snapshot.rollback": ("admin",),
            "status": ("admin",),
            "model.get": ("federation", "admin"), "model.merge": ("federation", "admin"),
            "model.stats": ("federation", "admin")}
ANY_ROLE_OPS = ("ping",)     # liveness: every admitted key
PUB_ROLES = ("device", "admin")  # who may subscribe to announcements
PUB_ZAP_DOMAIN = "edgecl.announcements"


@dataclass(frozen=True)
class KeyPair:
    public: bytes   # z85, 40 chars
    secret: bytes   # z85, 40 chars


def _read_certificate(path: str | os.PathLike, what: str) -> tuple[bytes, bytes | None]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; create keys with `edgecl keygen DIR`")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"{what} {path} is not a CURVE key file ({exc})") from None
    for name, key in (("public", public), ("secret", secret)):
        if key is not None and not _is_z85_key(key):
            raise UserError(f"{what} {path}: its {name} key is not a 40-character Z85 key")
    return public, secret


def _is_z85_key(key: bytes) -> bool:
    if len(key) != 40:
        return False
    try:
        return len(z85.decode(key)) == 32
    except (ValueError, KeyError, TypeError):
        return False


def load_public_key(path: str | os.PathLike, what: str = "public key file") -> bytes:
    return _read_certificate(path, what)[0]


def load_key_pair(path: str | os.PathLike, what: str = "key pair file") -> KeyPair:
    public, secret = _read_certificate(path, what)
    if secret is None:
        raise UserError(f"{what} {path} holds only a public key; give the {SECRET_SUFFIX} file "
                        "written by `edgecl keygen`")
    return KeyPair(public, secret)


def load_allowed_keys(directory: str | os.PathLike) -> set[bytes]:
    """Every public key in DIR/*.key. An empty or missing directory is an error: a daemon
    that admits nobody is never what was meant."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"client key directory {directory} does not exist")
    keys = {load_public_key(path, "client key file")
            for path in sorted(directory.glob(f"*{PUBLIC_SUFFIX}"))}
    if not keys:
        raise UserError(f"client key directory {directory} holds no *{PUBLIC_SUFFIX} files; "
                        "copy each client's public key there (`edgecl keygen DIR --name NAME`)")
    return keys


# ------------------------------------------------------------------------------ daemon side

class ServerCurve:
    """The daemon's key pair, allow-list and each key's roles; `apply` makes a socket a CURVE
    server, `start(ctx)` runs the ZAP handler that checks each connecting client's key, and
    `authorize(op, frame)` checks a request against the role of the key that sent it."""

    def __init__(self, keys: KeyPair, roles: dict[bytes, frozenset], allowed_dir: str):
        self.keys = keys
        self.roles = dict(roles)         # z85 public key -> its roles
        self.allowed = frozenset(roles)
        self.allowed_dir = allowed_dir
        self._authenticator = None
        self._lock = threading.Lock()
        self.refused = 0                 # handshakes with a key not on the list
        self._strangers: set[bytes] = set()
        self.refused_by_role = {role: 0 for role in ROLES}  # requests outside a key's role

    def start(self, ctx: zmq.Context) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        auth = ThreadAuthenticator(ctx, log=logging.getLogger("edgecl.security.zap"))
        auth.start()
        auth.configure_curve_callback(domain="*", credentials_provider=self)
        auth.configure_curve_callback(domain=PUB_ZAP_DOMAIN, credentials_provider=self)
        self._authenticator = auth

    def stop(self) -> None:
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None

    def apply(self, sock: zmq.Socket, announcements: bool = False) -> None:
        sock.curve_secretkey = self.keys.secret
        sock.curve_publickey = self.keys.public
        sock.curve_server = True
        if announcements:  # its own ZAP domain: only device and admin keys may subscribe
            sock.zap_domain = PUB_ZAP_DOMAIN.encode()

    def callback(self, domain: str, client_key: bytes) -> bool:
        """ZAP: admit a client key (z85) only if it is listed (and, for announcements, has a
        role that may subscribe). Runs in the ZAP thread."""
        roles = self.roles.get(client_key)
        if roles is not None and domain == PUB_ZAP_DOMAIN and not roles & set(PUB_ROLES):
            self._count_role_refusal(roles)
            log.warning("refused a %s key's subscription to announcements (roles %s may "
                        "subscribe)", "+".join(sorted(roles)), ", ".join(PUB_ROLES))
            return False
        if roles is not None:
            return True
        with self._lock:
            self.refused += 1
            first_time = (client_key not in self._strangers
                          and len(self._strangers) < MAX_LOGGED_STRANGERS)
            if first_time:
                self._strangers.add(client_key)
        if first_time:
            log.warning("refused a CURVE client whose key %s is not in %s",
                        client_key.decode("ascii", "replace"), self.allowed_dir)
        return False

    def authorize(self, op: str, frame) -> None:
        """Refuse (`forbidden`) an op outside the roles of the key that sent `frame` (its
        ZAP User-Id is the key). Ops no role lists need admin."""
        if op in ANY_ROLE_OPS:
            return
        key = frame.get("User-Id").encode("ascii")
        roles = self.roles.get(key, frozenset())
        needed = OP_ROLES.get(op, ("admin",))
        if roles & set(needed):
            return
        self._count_role_refusal(roles)
        raise WireError(ErrorCode.FORBIDDEN,
                        f"op {op!r} needs the {' or '.join(needed)} role; this client's key "
                        f"has {' and '.join(sorted(roles)) or 'no role'}")

    def _count_role_refusal(self, roles) -> None:
        with self._lock:
            for role in roles:
                self.refused_by_role[role] += 1


ROLE_SETTINGS = {"sensor": "allow_sensors", "device": "allow_devices", "admin": "allow_admins",
                 "federation": "allow_federation"}


def server_curve(serve) -> ServerCurve | None:
    """The daemon's CURVE setup from `serve.curve_secret` and the key directories, or None.

    `serve.allow_clients` keys get every role (the setup from before roles), with a warning;
    `serve.allow_sensors` / `allow_devices` / `allow_admins` / `allow_federation` keys get
    that one role."""
    if not serve.curve_secret:
        return None
    keys = load_key_pair(serve.curve_secret, "server key pair (--curve-secret)")
    roles: dict[bytes, set] = {}
    dirs = []
    if serve.allow_clients:
        for key in load_allowed_keys(serve.allow_clients):
            roles[key] = set(ROLES)
        dirs.append(serve.allow_clients)
        log.warning("every key in %s (serve.allow_clients) has every role: it may push, pull, "
                    "export, roll back, read status and read or merge the model. Give each "
                    "client only its role with serve.allow_sensors / allow_devices / "
                    "allow_admins / allow_federation (docs/security.md)",
                    serve.allow_clients)
    for role, setting in ROLE_SETTINGS.items():
        directory = getattr(serve, setting, "")
        if directory:
            for key in load_allowed_keys(directory):
                roles.setdefault(key, set()).add(role)
            dirs.append(directory)
    return ServerCurve(keys, {k: frozenset(v) for k, v in roles.items()}, ", ".join(dirs))


# ------------------------------------------------------------------------------ client side

@dataclass(frozen=True)
class ClientCurve:
    """What a client needs to reach a CURVE daemon: the daemon's public key, its own pair."""

    server_public: bytes
    keys: KeyPair

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.keys.public
        sock.curve_secretkey = self.keys.secret


def client_curve(server_key: str | None, key_pair: str | None) -> ClientCurve | None:
    """From the two client flags; neither means plain TCP, one without the other is an error."""
    if not server_key and not key_pair:
        return None
    if not (server_key and key_pair):
        raise UserError("CURVE needs both --curve-server-key (the daemon's .key file) and "
                        f"--curve-key (this client's {SECRET_SUFFIX} file)")
    return ClientCurve(load_public_key(server_key, "server public key (--curve-server-key)"),
                       load_key_pair(key_pair, "client key pair (--curve-key)"))


# ------------------------------------------------------------------------------ keygen

def keygen(directory: str | os.PathLike, name: str = SERVER_NAME,
           force: bool = False) -> tuple[Path, Path]:
    """Write DIR/NAME.key and DIR/NAME.key_secret (0600); returns (public, secret) paths."""
    if not KEY_NAME.match(name):
        raise UserError(f"--name {name!r}: use 1..64 letters, digits, '.', '_' or '-'")
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create key directory {directory}: {exc.strerror}") from None
    public = directory / f"{name}{PUBLIC_SUFFIX}"
    secret = directory / f"{name}{SECRET_SUFFIX}"
    existing = [str(p) for p in (public, secret) if p.exists()]
    if existing and not force:
        raise UserError(f"{' and '.join(existing)} already exist; pass --force to replace "
                        "them (every client holding the old public key is then locked out)")
    try:
        # Written in a private (0700) scratch directory, then renamed in: the secret is never
        # readable by others, not even for a moment.
        with tempfile.TemporaryDirectory(dir=directory, prefix=".keygen-") as scratch:
            made_public, made_secret = zmq.auth.create_certificates(scratch, name)
            os.chmod(made_secret, 0o600)
            os.chmod(made_public, 0o644)
            os.replace(made_secret, secret)
            os.replace(made_public, public)
    except OSError as exc:
        raise UserError(f"cannot write keys in {directory}: {exc.strerror}") from None
    return public, secret
