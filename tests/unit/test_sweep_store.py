"""Sweep store and runner: ids, claiming, resume, SIGKILL mid-run loses and duplicates nothing."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from lrscale_megatron.law.data import load_store
from lrscale_megatron.sweep.fake import synthetic_train_fn
from lrscale_megatron.sweep.runner import RunResult, SweepGrid, run_sweep
from lrscale_megatron.sweep.store import SweepStore, run_id

GRID = SweepGrid(
    widths=(64, 128),
    depths=(2,),
    token_budgets=(1e6,),
    batch_tokens=(4096,),
    lr_min=1e-4,
    lr_max=1e-2,
    n_lr=4,
)


def test_run_id_deterministic_and_add_idempotent(tmp_path):
    cfgs = GRID.expand()
    assert run_id(cfgs[0]) == run_id(dict(reversed(list(cfgs[0].items()))))
    store = SweepStore(tmp_path / "s.db")
    ids = store.add_runs(cfgs)
    store.add_runs(cfgs)
    assert len(set(ids)) == len(cfgs) == 8 and store.counts()["pending"] == 8
    owner = "otherhost:1"
    run = store.claim_next(owner)
    assert run is not None and run.state == "running" and run.attempts == 1
    assert store.reset_stale() == []  # other host: cannot tell, counts as alive
    assert store.reset_stale(alive=lambda o: False) == [run.run_id]
    with pytest.raises(ValueError, match="energy_j"):
        store.claim_next(owner)
        store.finish(store.runs("running")[0].run_id, owner, 2.0, None, 10, 1.0, 0.0)
    store.close()


def test_energy_zero_rejected():
    with pytest.raises(ValueError, match="RunResult.energy_j"):
        RunResult(final_train_loss=2.0, energy_j=0.0)


def test_sweep_two_workers_then_fit(tmp_path):
    db = tmp_path / "s.db"
    grid = SweepGrid(
        widths=(64, 128, 256),
        depths=(2, 4),
        token_budgets=(1e7, 1e8),
        batch_tokens=(4096, 65536),
        lr_min=1e-5,
        lr_max=1e-1,
        n_lr=9,
    )
    s = run_sweep(db, grid.expand()[:8], synthetic_train_fn, workers=2, progress=False)
    assert s.finished == 8
    s = run_sweep(db, grid.expand(), synthetic_train_fn, workers=1, progress=False)
    assert s.finished == s.total == 216 and s.skipped == 8
    store = SweepStore(db)
    assert all(r.attempts == 1 and r.energy_j is None for r in store.runs())
    assert all(len(store.steps(r.run_id)) == 5 for r in store.runs())
    store.close()
    table = load_store(db)
    assert len(table) == 216


_KILL_SCRIPT = textwrap.dedent(
    """
    import functools, sys
    from lrscale_megatron.sweep.fake import synthetic_train_fn
    from lrscale_megatron.sweep.runner import SweepGrid, run_sweep
    grid = SweepGrid(widths=(64, 128), depths=(2,), token_budgets=(1e6,), batch_tokens=(4096,), lr_min=1e-4, lr_max=1e-2, n_lr=4)
    fn = functools.partial(synthetic_train_fn, n_steps=10, step_seconds=0.05, start_log=sys.argv[2])
    run_sweep(sys.argv[1], grid.expand(), fn, workers=1, progress=False)
    """
)


def test_sigkill_mid_run_then_restart_loses_and_duplicates_nothing(tmp_path):
    db, log = tmp_path / "s.db", tmp_path / "starts.log"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(db), str(log)], start_new_session=True)
    deadline = time.time() + 30
    killed_state = None
    while time.time() < deadline:
        time.sleep(0.05)
        if not db.exists():
            continue
        store = SweepStore(db)
        try:
            c = store.counts()
            running = store.runs("running")
            if c["finished"] >= 2 and running and len(store.steps(running[0].run_id)) >= 3:
                os.killpg(proc.pid, signal.SIGKILL)
                killed_state = {r.run_id: (r.state, r.finished_at) for r in store.runs()}
                break
        finally:
            store.close()
    proc.wait(timeout=10)
    assert killed_state is not None, "sweep did not reach mid-run state in time"
    finished_before = {k for k, v in killed_state.items() if v[0] == "finished"}
    interrupted = {k for k, v in killed_state.items() if v[0] == "running"}
    assert len(interrupted) == 1

    fn = functools.partial(synthetic_train_fn, n_steps=10, step_seconds=0.0, start_log=str(log))
    s = run_sweep(db, GRID.expand(), fn, workers=1, progress=False)
    assert s.reset == 1 and s.total == 8 and s.finished == 8 and s.skipped == len(finished_before)

    store = SweepStore(db)
    runs = {r.run_id: r for r in store.runs()}
    assert len(runs) == 8 and set(runs) == {run_id(c) for c in GRID.expand()}
    for rid, r in runs.items():
        assert r.state == "finished"
        assert [st for st, _ in store.steps(rid)] == list(range(10))  # every step exactly once
        if rid in finished_before:
            assert r.attempts == 1 and r.finished_at == killed_state[rid][1]  # not redone
        elif rid in interrupted:
            assert r.attempts == 2
        else:
            assert r.attempts == 1
    store.close()
    starts = log.read_text().split()
    assert len(starts) == 8 + 1  # each run started once, the interrupted one twice


def test_progress_without_a_terminal_is_log_lines_not_redraws(tmp_path, caplog, capsys):
    caplog.set_level("INFO", logger="lrscale_megatron.sweep.runner")
    s = run_sweep(tmp_path / "s.db", GRID.expand()[:4], synthetic_train_fn, workers=2, progress=True)
    assert s.finished == 4
    assert "\r" not in capsys.readouterr().err  # pytest's stderr is no TTY: tqdm stays silent
    done = [r.getMessage() for r in caplog.records if "runs done" in r.getMessage()]
    assert done and done[-1] == "sweep: 4/4 runs done"
