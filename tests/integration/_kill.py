"""Kill a sweep-backed command mid-run (SIGKILL to its whole process group) at a chosen point of its
SQLite store, for the kill-and-rerun tests of ``lrscale sweep`` and ``lrscale tune``."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from lrscale_megatron.sweep.store import SweepStore


def store_states(store: Path) -> dict[str, int]:
    """``{state: count}`` of the store's runs (empty before the store or its tables exist)."""
    if not store.exists():
        return {}
    db = sqlite3.connect(store, timeout=30)
    try:
        return dict(db.execute("SELECT state, COUNT(*) FROM runs GROUP BY state").fetchall())
    except sqlite3.OperationalError:  # tables not created yet
        return {}
    finally:
        db.close()


def kill_mid_run(
    proc: subprocess.Popen, store: Path, min_finished: int, within_s: float
) -> tuple[list[str], dict[str, float | None]]:
    """Wait until ``min_finished`` runs are finished and one is running, SIGKILL ``proc``'s process group
    (it must be started with ``start_new_session=True``), and return the ids of the runs left
    ``running`` and ``{run id: finished_at}`` of the finished ones. Fails the test if ``proc`` exits
    first or the point is not reached within ``within_s`` seconds."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        s = store_states(store)
        if s.get("finished", 0) >= min_finished and s.get("running", 0) == 1:
            break
        if proc.poll() is not None:
            err = proc.stderr.read().decode()[-2000:] if proc.stderr else ""
            pytest.fail(f"exited early (rc {proc.returncode}): {err}")
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail(f"{min_finished} finished runs not reached within {within_s:.0f} s")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {r.run_id: r for r in SweepStore(store).runs()}
    killed = [rid for rid, r in before.items() if r.state == "running"]
    return killed, {rid: r.finished_at for rid, r in before.items() if r.state == "finished"}
