"""Smoke run of ``benchmarks/online_overhead.py --quick`` (tiny preset, 12 steps; a subprocess, so the
gloo process group and megatron's globals never live in the pytest process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "online_overhead.py"


@pytest.mark.timeout(120)
def test_online_overhead_quick(tmp_path):
    pytest.importorskip("megatron.core")
    out = tmp_path / "overhead.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # a one-process group of its own, on a free port
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    res = json.loads(out.read_text())
    assert res["preset"] == "tiny" and res["steps"] == 12
    assert len(res["baseline_seconds"]) == len(res["online_seconds"]) == 1
    # 12 steps, warmup 1 (steps // 10, at least 1), adapt_every 2000: exactly the one warmup check at step 1
    assert res["measurements"] == 1 and res["n_matvec_total"] >= 2  # Lanczos needs >= 2 products
    assert res["online_config"]["enabled"] is True and res["online_config"]["adapt_every"] == 2000
    # the time inside the measurement is part of the online run's wall-clock, and not all of it
    (total,), (online_s,) = res["measurement_seconds_total"], res["online_seconds"]
    assert 0 < total < online_s and res["measured_fraction"] == [total / online_s]
    assert res["seconds_per_measurement"] == total  # one measurement: the median is that one
    assert res["load_before"] and "online_overhead.py --quick" in res["command"]
    # the same-process figure: the measurement in units of the median iteration around it
    (m_iters,) = res["measurement_in_iterations"]
    assert m_iters > 0 and res["measured_fraction_local_iterations"] == [m_iters / 12]
