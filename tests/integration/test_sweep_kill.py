"""A real sweep (megatron-core GPT runs through ``lrscale_megatron.train``) SIGKILLed mid-run and
restarted loses nothing and duplicates nothing (configs/sweep/ci-tiny.json: 4 runs of 16 steps)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lrscale_megatron.sweep.cli import load_sweep_config
from lrscale_megatron.sweep.store import SweepStore, run_id
from tests.integration._kill import kill_mid_run

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "sweep" / "ci-tiny.json"


def _sweep(store: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lrscale_megatron.sweep.cli", str(CONFIG), "--store", str(store)]
    return subprocess.Popen(
        [*cmd, "--no-progress", "--workers", "1"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


@pytest.mark.timeout(240)
def test_real_sweep_sigkill_mid_run_loses_and_duplicates_nothing(tmp_path):
    store = tmp_path / "ci.sqlite"
    configs = load_sweep_config(CONFIG).grid.expand()
    n_steps = {run_id(c): c["tokens"] // c["batch_tokens"] for c in configs}
    proc = _sweep(store)
    # kill while a run is in flight and at least one run has finished before it
    killed, done_before = kill_mid_run(proc, store, min_finished=1, within_s=150)
    assert len(killed) == 1 and done_before

    proc = _sweep(store)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err.decode()[-3000:]
    st = SweepStore(store)
    runs = {r.run_id: r for r in st.runs()}
    assert set(runs) == set(n_steps) and all(r.state == "finished" for r in runs.values())
    for rid, r in runs.items():
        steps = [s for s, _ in st.steps(rid)]
        assert steps == list(range(1, n_steps[rid] + 1)), (rid, steps)  # every step once
        assert [s for s, _ in st.val_losses(rid)][-1] == n_steps[rid]
        assert r.final_val_loss is not None and r.energy_j is None  # CPU: unavailable, never 0
        assert r.tokens == n_steps[rid] * r.config["batch_tokens"]
    assert runs[killed[0]].attempts == 2  # the interrupted run was redone once
    for rid, t in done_before.items():  # finished runs were not redone
        assert runs[rid].attempts == 1 and runs[rid].finished_at == t
    st.close()
