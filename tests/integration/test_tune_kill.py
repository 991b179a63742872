"""``lrscale tune`` SIGKILLed mid-sweep and run again: finished runs are kept, the interrupted run is
redone once, nothing is duplicated, and the law and prediction are written (configs/tune/ci-tiny.json:
3 real megatron-core GPT proxies x 5 LRs of 24 steps)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lrscale_megatron.law.lawfile import load_law
from lrscale_megatron.sweep.cli import load_sweep_config
from lrscale_megatron.sweep.store import SweepStore, run_id
from tests.integration._kill import kill_mid_run

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "tune" / "ci-tiny.json"


def _tune(out: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "lrscale_megatron.cli",
        "tune",
        str(CONFIG),
        "--out",
        str(out),
        "--no-progress",
    ]
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_tune_sigkill_mid_sweep_then_rerun_keeps_finished_runs_and_duplicates_nothing(tmp_path):
    out = tmp_path / "tune"
    store = out / "sweep.sqlite"
    proc = _tune(out)
    killed, done_before = kill_mid_run(proc, store, min_finished=2, within_s=200)
    assert len(killed) == 1 and len(done_before) >= 2

    proc = _tune(out)
    stdout, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-3000:]
    configs = load_sweep_config(out / "ladder.json").grid.expand()
    st = SweepStore(store)
    runs = {r.run_id: r for r in st.runs()}
    assert set(runs) == {run_id(c) for c in configs} and len(runs) >= 15
    assert all(r.done for r in runs.values())  # finished, or diverged (kept as a result)
    for rid, r in runs.items():
        if r.state == "finished":
            assert [s for s, _ in st.steps(rid)] == list(range(1, 25))  # every step once
    assert runs[killed[0]].attempts == 2
    for rid, t in done_before.items():
        assert runs[rid].attempts == 1 and runs[rid].finished_at == t  # not redone
    st.close()
    law = load_law(out / "law.json")
    pred = json.loads((out / "prediction.json").read_text())
    assert law.predictors == ("params",) and law.provenance["bootstrap_unit"] == "(params, tokens) group"
    lo, hi = pred["interval"]
    assert lo <= pred["peak_lr"] <= hi and pred["extrapolation_factor"] > 1
    assert pred["scheduler"]["type"] == "LRScale" and pred["scheduler"]["params"]["total_steps"] == 24
    assert any(f.startswith("--lr ") for f in pred["megatron_flags"])
    assert b"target peak_lr" in stdout
