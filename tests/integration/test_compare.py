"""``lrscale compare`` end to end on ``configs/compare/ci-smoke.json`` (4 arms x 2 seeds x 16 iterations).

The job runs in a subprocess (the gloo group and DeepSpeed's globals never live in the pytest process),
then again: the second call must find every run on disk and train nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "compare" / "ci-smoke.json"
ARMS = {"cosine", "inverse_sqrt", "lrscale_offline", "lrscale_online"}


def _compare(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "lrscale_megatron.compare.cli",
            str(CONFIG),
            "--set",
            f"output_dir={json.dumps(str(out))}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_compare_writes_report_with_all_arms(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    proc = _compare(out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "report:" in proc.stdout and "| cosine |" in proc.stdout

    rep = json.loads((out / "report.json").read_text())
    assert isinstance(rep["target_loss"], float)
    names = [a["name"] for a in rep["arms"]]
    assert set(names) == ARMS and len(names) == 4
    for a in rep["arms"]:
        for key in ("name", "steps_to_target", "wall_to_target_s", "final_val_loss"):
            assert key in a, (a["name"], key)
        assert len(a["per_seed"]) == 2  # two seeds, spread reported
        assert a["stats"]["final_val_loss"]["n"] == 2
        for row in a["per_seed"]:
            assert row["energy_to_target_j"] is None or row["energy_to_target_j"] > 0  # never a fake 0
    # the target derives from the cosine arm (max over seeds x 1.01): every cosine seed reaches it
    cos = next(a for a in rep["arms"] if a["name"] == "cosine")
    assert cos["reached"] == "2/2" and cos["steps_to_target"] <= rep["steps"]
    assert "lrscale_offline_over_cosine_steps_to_target" in rep["ratios"]
    assert rep["baseline"]["justification"]
    assert rep["offline_peak"]["warnings"], "cpu-tiny is far outside the shipped law's range: must be said"
    online = next(a for a in rep["arms"] if a["name"] == "lrscale_online")
    assert all(r["n_measurements"] > 0 for r in online["per_seed"])

    for png in ("loss.png", "lr.png", "lambda_max.png"):
        p = out / png
        assert p.is_file() and p.stat().st_size > 1000, png
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "Time to target" in md and all(f"| {n} |" in md for n in ARMS)

    # a rerun finds every finished run on disk and trains nothing
    proc2 = _compare(out)
    assert proc2.returncode == 0, proc2.stderr[-4000:]
    rep2 = json.loads((out / "report.json").read_text())
    assert rep2["runs"]["trained"] == 0 and rep2["runs"]["reused"] == 8
    assert [a["final_val_loss"] for a in rep2["arms"]] == [a["final_val_loss"] for a in rep["arms"]]
