"""The curvature benchmarks run end to end (``--quick``) and print the tables docs/benchmarks.md quotes.

Only the shape of the output is checked: the figures themselves depend on the machine and its load.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str) -> str:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    # 1 thread: on a loaded 2-core machine two torch threads can be ~100x slower (spin-waiting).
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--threads", "1"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def _rows(out: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in out.splitlines()
        if line.startswith("|") and not line.startswith("|---")
    ]


@pytest.mark.timeout(150)
def test_curvature_vs_pyhessian_quick() -> None:
    # PyHessian comes with the `bench` extra, which scripts/test.sh installs: a missing peer fails here
    out = _run("curvature_vs_pyhessian.py")
    rows = _rows(out)
    labels = ("gpt float64", "gpt float32", "neardegen float64", "neardegen float32")
    for section in ("(a) products to", "(a) lambda_max", "(b) wall time"):
        assert section in out
    for label in labels:
        methods = {r[1] for r in rows if r[0] == label}
        assert {"lrscale lanczos", "PyHessian eigenvalues(top_n=5)", "**ratio**"} <= methods, (label, methods)
        assert sum(r[0] == label for r in rows) == 3 + 1 + 1  # 3 top-5 rows, 1 lambda_max row, 1 wall row
    assert {r[0] for r in rows if r[0] in ("gpt", "neardegen")} == {"gpt", "neardegen"}  # reference rows


@pytest.mark.timeout(150)
def test_hvp_cost_quick() -> None:
    out = _run("hvp_cost.py")
    got = {(r[0], r[2]) for r in _rows(out) if r[0] in ("megatron", "torch")}
    want = {
        (m, mode) for m in ("megatron", "torch") for mode in ("train", "exact", "fd-forward", "fd-central")
    }
    assert want | {("torch", "jvp")} == got
