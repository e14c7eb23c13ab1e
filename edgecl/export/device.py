"""Moved to edgecl.client.device (the device is a client; the snapshot store stays here).
Kept so that `from edgecl.export.device import DeviceClient` goes on working."""
from edgecl.client.device import (PARTIAL_DIR, REJECTED_TOPIC, TOPIC, DeviceClient,  # noqa: F401
                                  _pub_address, verify_installed)
