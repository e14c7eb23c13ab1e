"""Clients of the daemon, for the CLI and for users' own programs; none imports torch.

- `connection`: sockets, the one Lazy Pirate retry, `Connection` (request/reply), the errors.
- `sensor`: `SensorClient`, which pushes labeled samples.
- `device`: `DeviceClient`, which pulls and follows ONNX snapshots (and `pull_and_score`).
- `federation`: `ModelClient`, which reads the site's model and merges a global one in.

Everything a program needs is importable from `edgecl.client` itself.
"""
from edgecl.client.connection import (DEFAULT_RETRIES, DEFAULT_TIMEOUT_S, Connection,
                                      DaemonError, DaemonUnavailable, LazyPirate, PushRefused,
                                      RequestRefused, get_status, new_socket, ping)
from edgecl.client.device import DeviceClient, pull_and_score, verify_installed
from edgecl.client.federation import ClassStats, ModelClient, SiteModel
from edgecl.client.sensor import PushStats, SensorClient, _as_batch, iter_batches

__all__ = ["ClassStats", "DEFAULT_RETRIES", "DEFAULT_TIMEOUT_S", "Connection", "DaemonError",
           "DaemonUnavailable", "DeviceClient", "LazyPirate", "ModelClient", "PushRefused",
           "PushStats", "RequestRefused", "SensorClient", "SiteModel", "get_status",
           "iter_batches", "new_socket", "ping", "pull_and_score", "verify_installed",
           "_as_batch"]
