"""The documented command: `torchrun --nproc_per_node 4 -m lrscale_megatron.cli spectrum --tp 2 --pp 2`
writes the same lambda_max, top-k, trace and per-layer sharpness as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.distributed._launch import torchrun

ARGS = [
    "spectrum",
    "--preset",
    "tiny",
    "--dtype",
    "float64",
    "--seed",
    "0",
    "--top-k",
    "2",
    "--max-iter",
    "12",
    "--trace-samples",
    "3",
    "--per-layer",
]


def test_tp2_pp2_spectrum_equals_single_process(tmp_path):
    one, four = tmp_path / "one.json", tmp_path / "four.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(
        [sys.executable, "-m", "lrscale_megatron.cli", *ARGS, "--json", str(one)],
        check=True,
        capture_output=True,
        env=env,
        timeout=600,
    )
    torchrun(4, "-m", "lrscale_megatron.cli", *ARGS, "--tp", "2", "--pp", "2", "--json", str(four))
    a, b = json.loads(one.read_text()), json.loads(four.read_text())
    assert b["config"]["tp"] == 2 and b["config"]["pp"] == 2
    assert abs(b["lambda_max"] - a["lambda_max"]) <= 1e-6 * abs(a["lambda_max"])
    for x, y in zip(b["eigenvalues"], a["eigenvalues"]):
        assert abs(x - y) <= 1e-6 * abs(y)
    assert abs(b["trace"]["estimate"] - a["trace"]["estimate"]) <= 1e-6 * abs(a["trace"]["estimate"])
    assert abs(b["loss"] - a["loss"]) <= 1e-12
    assert set(b["per_layer"]) == {"embedding", "layers.0", "layers.1", "final"}
    for name, r in a["per_layer"].items():
        assert abs(b["per_layer"][name]["lambda_max"] - r["lambda_max"]) <= 1e-6 * abs(r["lambda_max"]), name
