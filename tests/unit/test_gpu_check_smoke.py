"""benchmarks/gpu_check.sh runs end to end on CPU (``--cpu-smoke``, tiny sizes): the tables print and
the JSON has every figure the GPU run reports. The figures themselves are not checked here."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_cpu_smoke(tmp_path):
    out = tmp_path / "gc.json"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "OUT": str(out)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    import sys

    env["PYTHON"] = sys.executable
    res = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-smoke"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())
    a = r["accuracy"]
    for k in ("ref_fp32_exact", "bf16_fd", "bf16_exact"):
        assert a[k]["lambda_max"] is not None and "converged" in a[k]
    assert a["time"]["fwd_bwd_s"] > 0 and a["time"]["fd_product_s"] > 0
    hv = a["host_vectors"]  # benchmarks/gpu_host_vectors.py: the host product is the device one
    assert hv["host,split1"]["equals_device"] and hv["host,split2"]["product_s"] > 0
    assert r["memory"]["estimated_extra_gib"] > 0 and r["memory"]["measurement"]["n_matvec"] > 0
    assert "| measurement | lambda_max |" in res.stdout and "fd / fwd+bwd" in res.stdout
    assert "| host (= device bit for bit) | 1 |" in res.stdout


def test_gpu_check_refuses_without_cuda_unless_smoke(tmp_path):
    import sys

    import torch

    if torch.cuda.is_available():
        return  # on a GPU machine the full check is tests/gpu/test_gpu_check.py
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--json", str(tmp_path / "x.json")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert res.returncode == 2 and "--cpu-smoke" in res.stderr
