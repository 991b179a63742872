"""The GPU check (benchmarks/gpu_check.sh) on a real GPU: bf16 lambda_max by fd and exact products
within 5 % of the fp32 reference (or exact refused with the reason), the measurement's measured extra
memory within the preflight estimate. Skipped without CUDA (tests/gpu only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    res = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    print(res.stdout)
    r = json.loads(out.read_text())
    a = r["accuracy"]
    assert a["ref_fp32_exact"]["converged"]
    fd = a["bf16_fd"]
    assert fd["converged"] and fd["rel_err"] <= 0.05, fd
    ex = a["bf16_exact"]
    assert (ex["lambda_max"] is None and ex["reason"]) or (ex["converged"] and ex["rel_err"] <= 0.05), ex
    m = r["memory"]
    assert m is not None and m["measurement"]["converged"]
    assert m["measured_extra_gib"] <= 1.1 * m["estimated_extra_gib"]  # the estimate is an upper bound
