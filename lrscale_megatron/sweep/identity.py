"""Who a run is and who runs it: the config hash that keys a run, the ``host:pid`` owner tag and its liveness."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from typing import Any


def run_id(config: dict[str, Any]) -> str:
    """Deterministic id of a run: sha256 of the canonical JSON of its full config (16 hex chars)."""
    canon = json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def this_owner() -> str:
    """Owner tag of the calling process: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_alive(owner: str) -> bool:
    """True unless ``owner`` is a process of this host that no longer exists.

    Owners on other hosts cannot be checked and count as alive.
    """
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
