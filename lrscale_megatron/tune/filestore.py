"""Results of many writers on a shared filesystem: one file per run, merged by the head.

No SQLite on a shared filesystem (NFS/Lustre locking is not reliable): a compute node never opens
the sweep database. Each run writes

* ``RUNS/<run_id>.json``: its result (finished / diverged / failed, final losses, per-step losses),
  written to a temporary file in the same directory and renamed over the target (``os.replace`` is
  atomic on POSIX filesystems), so a reader sees either no file or a whole one;
* ``RUNS/<run_id>.hb``: a heartbeat, ``{"time": <unix seconds>, "host": ..., "attempt": ...}``, rewritten
  (atomically) every few seconds while the run trains. A run whose heartbeat is older than the
  staleness limit and that has no result lost its node and is redone. Liveness is read from the
  timestamp written by the node itself, never from a pid (which means nothing on another host).

The head merges result files into its own store (:meth:`SweepStore.record_result`, one transaction
per run, idempotent by run id): two writers of the same run (a node thought dead that comes back)
leave one run, never two, and a merge killed half-way is redone from the files.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from lrscale_megatron.sweep.store import SweepStore, run_id

logger = logging.getLogger(__name__)

DONE_STATES = ("finished", "diverged")


def atomic_write_json(path: Path, doc: Any) -> None:
    """Write ``doc`` to ``path`` so that readers never see a partial file (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    with tmp.open("w") as fh:
        json.dump(doc, fh, allow_nan=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def result_path(runs_dir: Path, rid: str) -> Path:
    return runs_dir / f"{rid}.json"


def heartbeat_path(runs_dir: Path, rid: str) -> Path:
    return runs_dir / f"{rid}.hb"


def read_result(runs_dir: Path, rid: str) -> dict[str, Any] | None:
    """The result document of a run, ``None`` when none was written yet."""
    p = result_path(runs_dir, rid)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        return None


def heartbeat_age(runs_dir: Path, rid: str, now: float | None = None) -> float | None:
    """Seconds since the run's last heartbeat (by the time written in it); ``None`` without one."""
    p = heartbeat_path(runs_dir, rid)
    try:
        doc = json.loads(p.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return (time.time() if now is None else now) - float(doc["time"])


class Heartbeat:
    """Stamps ``RUNS/<run_id>.hb`` every ``every_s`` seconds from a daemon thread while a run trains."""

    def __init__(self, runs_dir: Path, rid: str, attempt: int, every_s: float) -> None:
        self.path = heartbeat_path(runs_dir, rid)
        self.attempt, self.every_s = attempt, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def beat(self) -> None:
        atomic_write_json(
            self.path,
            {"time": time.time(), "host": socket.gethostname(), "pid": os.getpid(), "attempt": self.attempt},
        )

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.beat()

    def __enter__(self) -> Heartbeat:
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def write_result(
    runs_dir: Path,
    config: dict[str, Any],
    state: str,
    *,
    final_train_loss: float | None = None,
    final_val_loss: float | None = None,
    tokens: int | None = None,
    wall_clock_s: float | None = None,
    energy_j: float | None = None,
    steps: list[tuple[int, float, int | None, float | None]] | None = None,
    vals: list[tuple[int, float, int | None]] | None = None,
    error: str | None = None,
    attempt: int = 1,
) -> Path:
    """Atomically write a run's result file (``state``: finished, diverged or failed)."""
    if state not in (*DONE_STATES, "failed"):
        raise ValueError(f"write_result: state={state!r}; fix: use finished, diverged or failed")
    rid = run_id(config)
    doc = {
        "run_id": rid,
        "config": config,
        "state": state,
        "final_train_loss": final_train_loss,
        "final_val_loss": final_val_loss,
        "tokens": tokens,
        "wall_clock_s": wall_clock_s,
        "energy_j": energy_j,
        "steps": [list(s) for s in steps or []],
        "vals": [list(v) for v in vals or []],
        "error": error,
        "host": socket.gethostname(),
        "attempt": attempt,
        "written_at": time.time(),
    }
    p = result_path(runs_dir, rid)
    atomic_write_json(p, doc)
    return p


def merge_results(runs_dir: Path, store_path: Path, configs: list[dict[str, Any]]) -> dict[str, str]:
    """Record every result file of ``configs`` into the store (idempotent); returns ``run_id -> state``
    of the result files found (``finished`` / ``diverged`` / ``failed``)."""
    found: dict[str, str] = {}
    store = SweepStore(store_path)
    try:
        for cfg in configs:
            rid = run_id(cfg)
            doc = read_result(runs_dir, rid)
            if doc is None:
                continue
            if doc.get("run_id") != rid or doc.get("config") != cfg:
                raise ValueError(
                    f"{result_path(runs_dir, rid)}: result of another run (run_id/config mismatch); "
                    "fix: delete the file, it will be redone"
                )
            found[rid] = doc["state"]
            store.record_result(cfg, doc)
    finally:
        store.close()
    return found
