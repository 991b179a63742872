"""SQLite store of sweep runs, safe against processes killed at any instant.

* WAL journal; every state change (claim, step, eval, finish, fail, reset) is one transaction, so a
  SIGKILL leaves the store at the last committed change.
* Runs are keyed by :func:`run_id`, a hash of the full config: adding the same config twice is a no-op.
* States: ``pending`` -> ``running`` -> ``finished`` | ``failed``. Claiming is an atomic
  ``UPDATE ... WHERE state='pending'`` inside ``BEGIN IMMEDIATE``, so two workers never run the same run.
* A run left ``running`` by a dead process (owner ``host:pid`` no longer alive) is reset to
  ``pending`` by :meth:`SweepStore.reset_stale`; its partial steps are deleted when it is claimed again,
  so a redone run never duplicates steps.
* ``energy_j`` is NULL when unavailable, never 0. A diverged run is ``failed`` with a ``diverged:`` error.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lrscale_megatron.sweep.identity import owner_alive, run_id, this_owner

logger = logging.getLogger(__name__)

__all__ = ["DIVERGED_PREFIX", "STATES", "Run", "SweepStore", "owner_alive", "run_id", "this_owner"]

STATES = ("pending", "running", "finished", "failed")

#: Error prefix of a run that *diverged* (NaN/Inf loss): a result, never retried; the law reads it as +inf.
DIVERGED_PREFIX = "diverged:"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    config TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'running', 'finished', 'failed')),
    owner TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    tokens INTEGER,
    wall_clock_s REAL,
    energy_j REAL CHECK (energy_j IS NULL OR energy_j > 0),
    final_train_loss REAL,
    final_val_loss REAL,
    error TEXT
);
CREATE TABLE IF NOT EXISTS train_steps (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    step INTEGER NOT NULL,
    loss REAL NOT NULL,
    tokens INTEGER,
    wall_clock_s REAL,
    PRIMARY KEY (run_id, step)
);
CREATE TABLE IF NOT EXISTS val_losses (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    step INTEGER NOT NULL,
    loss REAL NOT NULL,
    tokens INTEGER,
    PRIMARY KEY (run_id, step)
);
"""


@dataclass(frozen=True)
class Run:
    """One row of the ``runs`` table."""

    run_id: str
    config: dict[str, Any]
    state: str
    owner: str | None
    attempts: int
    tokens: int | None
    wall_clock_s: float | None
    energy_j: float | None
    final_train_loss: float | None
    final_val_loss: float | None
    error: str | None
    started_at: float | None
    finished_at: float | None

    @property
    def diverged(self) -> bool:
        """The run ended with a NaN/Inf loss (stored as ``failed`` with a ``diverged:`` error)."""
        return self.state == "failed" and (self.error or "").startswith(DIVERGED_PREFIX)

    @property
    def done(self) -> bool:
        """Finished, or diverged (both are results; neither is run again)."""
        return self.state == "finished" or self.diverged


class SweepStore:
    """A sweep database at ``path`` (created if absent). One connection per process."""

    def __init__(self, path: str | Path, timeout_s: float = 60.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self._tx() as db:
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    db.execute(stmt)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``: takes the write lock up front)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- adding and claiming -------------------------------------------------------------------

    def add_runs(self, configs: Iterable[dict[str, Any]]) -> list[str]:
        """Insert configs as pending runs (existing ids untouched); returns their ids in order."""
        ids = []
        now = time.time()
        with self._tx() as db:
            for cfg in configs:
                rid = run_id(cfg)
                ids.append(rid)
                db.execute(
                    "INSERT OR IGNORE INTO runs (run_id, config, state, created_at) VALUES (?, ?, 'pending', ?)",
                    (rid, json.dumps(cfg, sort_keys=True), now),
                )
        return ids

    def claim_next(self, owner: str, run_ids: Iterable[str] | None = None) -> Run | None:
        """Atomically move one pending run (optionally among ``run_ids``) to running; ``None`` if none left."""
        with self._tx() as db:
            if run_ids is None:
                row = db.execute(
                    "SELECT run_id FROM runs WHERE state='pending' ORDER BY created_at, run_id LIMIT 1"
                ).fetchone()
            else:
                ids = list(run_ids)
                row = None
                for chunk in range(0, len(ids), 500):
                    part = ids[chunk : chunk + 500]
                    q = f"SELECT run_id FROM runs WHERE state='pending' AND run_id IN ({','.join('?' * len(part))}) ORDER BY created_at, run_id LIMIT 1"
                    row = db.execute(q, part).fetchone()
                    if row:
                        break
            if row is None:
                return None
            rid = row["run_id"]
            db.execute("DELETE FROM train_steps WHERE run_id=?", (rid,))
            db.execute("DELETE FROM val_losses WHERE run_id=?", (rid,))
            db.execute(
                "UPDATE runs SET state='running', owner=?, attempts=attempts+1, started_at=?, finished_at=NULL, error=NULL "
                "WHERE run_id=? AND state='pending'",
                (owner, time.time(), rid),
            )
        return self.get(rid)

    def reset_stale(self, alive: Callable[[str], bool] = owner_alive) -> list[str]:
        """Reset ``running`` runs whose owner is dead to ``pending``; returns their ids."""
        reset = []
        with self._tx() as db:
            for row in db.execute("SELECT run_id, owner FROM runs WHERE state='running'").fetchall():
                if row["owner"] is None or not alive(row["owner"]):
                    db.execute("UPDATE runs SET state='pending', owner=NULL WHERE run_id=?", (row["run_id"],))
                    reset.append(row["run_id"])
        if reset:
            logger.warning("reset %d run(s) left running by dead processes: %s", len(reset), ", ".join(reset))
        return reset

    def retry_failed(self) -> list[str]:
        """Move failed runs back to pending (diverged runs stay: they are results); returns their ids."""
        q = "FROM runs WHERE state='failed' AND (error IS NULL OR error NOT LIKE ?)"
        with self._tx() as db:
            ids = [r["run_id"] for r in db.execute(f"SELECT run_id {q}", (DIVERGED_PREFIX + "%",)).fetchall()]
            db.execute(
                f"UPDATE runs SET state='pending', owner=NULL {q.removeprefix('FROM runs ')}",
                (DIVERGED_PREFIX + "%",),
            )
        return ids

    # -- progress of one run ---------------------------------------------------------------------

    def _check_owner(self, db: sqlite3.Connection, rid: str, owner: str) -> None:
        row = db.execute("SELECT state, owner FROM runs WHERE run_id=?", (rid,)).fetchone()
        if row is None or row["state"] != "running" or row["owner"] != owner:
            got = None if row is None else (row["state"], row["owner"])
            raise RuntimeError(f"run {rid}: not running under owner {owner!r} (state, owner) = {got}")

    def log_step(
        self,
        rid: str,
        owner: str,
        step: int,
        loss: float,
        tokens: int | None = None,
        wall_clock_s: float | None = None,
    ) -> None:
        """Record the train loss of optimizer step ``step`` (one transaction)."""
        with self._tx() as db:
            self._check_owner(db, rid, owner)
            db.execute(
                "INSERT OR REPLACE INTO train_steps (run_id, step, loss, tokens, wall_clock_s) VALUES (?, ?, ?, ?, ?)",
                (rid, int(step), float(loss), tokens, wall_clock_s),
            )

    def log_val(self, rid: str, owner: str, step: int, loss: float, tokens: int | None = None) -> None:
        """Record a validation loss at optimizer step ``step`` (one transaction)."""
        with self._tx() as db:
            self._check_owner(db, rid, owner)
            db.execute(
                "INSERT OR REPLACE INTO val_losses (run_id, step, loss, tokens) VALUES (?, ?, ?, ?)",
                (rid, int(step), float(loss), tokens),
            )

    def finish(
        self,
        rid: str,
        owner: str,
        final_train_loss: float,
        final_val_loss: float | None,
        tokens: int | None,
        wall_clock_s: float,
        energy_j: float | None,
    ) -> None:
        """Mark a run finished with its results (one transaction). ``energy_j=None`` = not measured."""
        if energy_j is not None and not energy_j > 0:
            raise ValueError(
                f"run {rid}: energy_j={energy_j!r}; fix: report None when energy is unavailable, never 0"
            )
        with self._tx() as db:
            self._check_owner(db, rid, owner)
            db.execute(
                "UPDATE runs SET state='finished', finished_at=?, final_train_loss=?, final_val_loss=?, tokens=?, "
                "wall_clock_s=?, energy_j=? WHERE run_id=?",
                (time.time(), final_train_loss, final_val_loss, tokens, wall_clock_s, energy_j, rid),
            )

    def fail(self, rid: str, owner: str, error: str, wall_clock_s: float | None = None) -> None:
        """Mark a run failed with its error text (one transaction)."""
        with self._tx() as db:
            self._check_owner(db, rid, owner)
            db.execute(
                "UPDATE runs SET state='failed', finished_at=?, error=?, wall_clock_s=? WHERE run_id=?",
                (time.time(), error, wall_clock_s, rid),
            )

    def record_result(self, config: dict[str, Any], doc: dict[str, Any]) -> bool:
        """Record a run done elsewhere (a result file of :mod:`lrscale_megatron.tune.filestore`) in one
        transaction. Idempotent: a run already finished or diverged here is kept (returns ``False``)."""
        rid = run_id(config)
        state = doc["state"]
        if state not in ("finished", "diverged", "failed"):
            raise ValueError(f"run {rid}: result state={state!r}; fix: finished, diverged or failed")
        energy = doc.get("energy_j")
        if energy is not None and not energy > 0:
            raise ValueError(f"run {rid}: energy_j={energy!r}; fix: None when unavailable, never 0")
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO runs (run_id, config, state, created_at) VALUES (?, ?, 'pending', ?)",
                (rid, json.dumps(config, sort_keys=True), now),
            )
            row = db.execute("SELECT state, error FROM runs WHERE run_id=?", (rid,)).fetchone()
            if row["state"] == "finished" or (
                row["state"] == "failed" and (row["error"] or "").startswith(DIVERGED_PREFIX)
            ):
                return False
            db.execute("DELETE FROM train_steps WHERE run_id=?", (rid,))
            db.execute("DELETE FROM val_losses WHERE run_id=?", (rid,))
            db.executemany(
                "INSERT OR REPLACE INTO train_steps (run_id, step, loss, tokens, wall_clock_s) VALUES (?, ?, ?, ?, ?)",
                [(rid, int(st), float(lo), tk, wl) for st, lo, tk, wl in doc.get("steps", [])],
            )
            db.executemany(
                "INSERT OR REPLACE INTO val_losses (run_id, step, loss, tokens) VALUES (?, ?, ?, ?)",
                [(rid, int(st), float(lo), tk) for st, lo, tk in doc.get("vals", [])],
            )
            error = doc.get("error")
            if state == "diverged":
                error = f"{DIVERGED_PREFIX} {error or 'NaN/Inf loss'}"
            db.execute(
                "UPDATE runs SET state=?, owner=?, attempts=?, started_at=?, finished_at=?, final_train_loss=?, "
                "final_val_loss=?, tokens=?, wall_clock_s=?, energy_j=?, error=? WHERE run_id=?",
                (
                    "finished" if state == "finished" else "failed",
                    f"file:{doc.get('host', '?')}",
                    int(doc.get("attempt", 1)),
                    doc.get("written_at"),
                    doc.get("written_at"),
                    doc.get("final_train_loss"),
                    doc.get("final_val_loss"),
                    doc.get("tokens"),
                    doc.get("wall_clock_s"),
                    energy,
                    error,
                    rid,
                ),
            )
        return True

    # -- reading ------------------------------------------------------------------------------------

    @staticmethod
    def _run(row: sqlite3.Row) -> Run:
        return Run(
            run_id=row["run_id"],
            config=json.loads(row["config"]),
            state=row["state"],
            owner=row["owner"],
            attempts=row["attempts"],
            tokens=row["tokens"],
            wall_clock_s=row["wall_clock_s"],
            energy_j=row["energy_j"],
            final_train_loss=row["final_train_loss"],
            final_val_loss=row["final_val_loss"],
            error=row["error"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
        )

    def get(self, rid: str) -> Run | None:
        row = self._db.execute("SELECT * FROM runs WHERE run_id=?", (rid,)).fetchone()
        return None if row is None else self._run(row)

    def runs(self, state: str | None = None) -> list[Run]:
        if state is not None and state not in STATES:
            raise ValueError(f"state={state!r}; fix: use one of {STATES}")
        q = "SELECT * FROM runs" + (" WHERE state=?" if state else "") + " ORDER BY created_at, run_id"
        return [self._run(r) for r in self._db.execute(q, (state,) if state else ()).fetchall()]

    def finished_runs(self) -> list[Run]:
        return self.runs("finished")

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATES, 0)
        for row in self._db.execute("SELECT state, COUNT(*) AS n FROM runs GROUP BY state"):
            out[row["state"]] = row["n"]
        return out

    def steps(self, rid: str) -> list[tuple[int, float]]:
        """(step, train loss) of a run, by step."""
        return [
            (r["step"], r["loss"])
            for r in self._db.execute(
                "SELECT step, loss FROM train_steps WHERE run_id=? ORDER BY step", (rid,)
            )
        ]

    def val_losses(self, rid: str) -> list[tuple[int, float]]:
        """(step, validation loss) of a run, by step."""
        return [
            (r["step"], r["loss"])
            for r in self._db.execute(
                "SELECT step, loss FROM val_losses WHERE run_id=? ORDER BY step", (rid,)
            )
        ]
