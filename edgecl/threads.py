"""Thread scheduling helpers: the daemon's threads share a few cores, and the socket loop,
which only answers, must get a core when it needs one."""
from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger("edgecl.threads")


def lower_this_thread(niceness: int) -> None:
    """Give the calling thread a lower CPU priority (Linux: a nice value per thread), so the
    heavy background work it does (learning, exports) yields the cores to the socket loop.
    Elsewhere, or without permission, a no-op."""
    if not hasattr(os, "setpriority") or not hasattr(threading, "get_native_id"):
        return
    try:
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + niceness))
    except OSError as exc:
        log.debug("cannot lower the priority of thread %s: %s", threading.current_thread().name,
                  exc)
