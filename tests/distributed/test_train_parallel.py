"""``python -m lrscale_megatron.train`` under TP=2 and PP=2 (gloo, 2 processes each) follows the
one-process loss curve of the ``cpu-tiny`` config for 20 steps within 1e-5, and a PP=2 run resumed from
its step-10 checkpoint reproduces steps 11-20 exactly.

float32 (the dtype the CPU presets train in): megatron computes the cross entropy on float32 logits, so
float64 parameters would not make the loss more exact; observed differences are <= 2.4e-7 (2 ulp of a
loss near 5), while a real layout bug (a gradient clipped with the wrong norm) moved the curve by 4e-3.
TP=2 runs through the DeepSpeed engine (forward/backward/step); PP=2 through megatron's 1F1B schedule
with the loop's own tied-embedding reduction, TP/PP-aware clipping and ``engine.step()``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed._launch import torchrun

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "gpt" / "cpu-tiny.json")
OVERRIDES = [
    "training.steps=20",
    "training.eval_every=10",
    "training.eval_batches=1",
    "training.output_dir=null",
]
TOL = 1e-5


def _run(tmp: Path, name: str, nproc: int, *extra: str) -> dict:
    out = tmp / f"{name}.json"
    args = ["-m", "lrscale_megatron.train", CONFIG, "--override", *OVERRIDES, *extra, "--json", str(out)]
    if nproc == 1:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", DS_ACCELERATOR="cpu")
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    else:
        torchrun(nproc, *args)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    return _run(tmp_path_factory.mktemp("train"), "tp1pp1", 1)


def _assert_same_curve(ref: dict, got: dict) -> None:
    assert len(got["history"]) == len(ref["history"]) == 20
    for a, b in zip(ref["history"], got["history"]):
        assert a["step"] == b["step"] and a["tokens"] == b["tokens"] and a["lr"] == b["lr"]
        assert abs(a["train_loss"] - b["train_loss"]) <= TOL, (a, b)
        if a["val_loss"] is not None:
            assert abs(a["val_loss"] - b["val_loss"]) <= TOL, (a, b)
    assert abs(ref["final_val_loss"] - got["final_val_loss"]) <= TOL
    assert abs(ref["shift_loss"] - got["shift_loss"]) <= TOL
    assert ref["history"][-1]["train_loss"] < ref["history"][0]["train_loss"] - 1.0  # it learns


def test_tp2_follows_single_process(reference, tmp_path):
    got = _run(tmp_path, "tp2", 2, "parallel.tp=2")
    assert got["layout"] == {"tp": 2, "pp": 1, "dp": 1, "world_size": 2}
    _assert_same_curve(reference, got)
    # the last-word metric gathers the vocabulary-parallel logits: same words, same NLL as one process
    assert got["lambada"]["n"] == reference["lambada"]["n"] > 0
    assert got["lambada"]["accuracy"] == reference["lambada"]["accuracy"]
    assert got["lambada"]["word_nll"] == pytest.approx(reference["lambada"]["word_nll"], rel=1e-5)


@pytest.fixture(scope="module")
def pp2(tmp_path_factory) -> tuple[dict, Path]:
    tmp = tmp_path_factory.mktemp("pp2")
    return _run(
        tmp, "pp2", 2, "parallel.pp=2", f'checkpoint.dir="{tmp / "ck"}"', "checkpoint.save_every=10"
    ), tmp


def test_pp2_follows_single_process(reference, pp2):
    got = pp2[0]
    assert got["layout"] == {"tp": 1, "pp": 2, "dp": 1, "world_size": 2}
    _assert_same_curve(reference, got)
    assert got["lambada"] is None  # auto: off under pipeline parallelism (explicit counts are refused)


def test_pp2_resume_is_exact(pp2):
    """Pipeline path checkpoint (per-stage model shards, optimizer, LRScale state, per-rank RNG) resumes exactly."""
    full, tmp = pp2
    resumed = _run(tmp, "pp2-resumed", 2, "parallel.pp=2", f'checkpoint.load="{tmp / "ck" / "step10"}"')
    for a, b in zip(full["history"], resumed["history"]):
        assert (a["step"], a["train_loss"], a["lr"], a["val_loss"]) == (
            b["step"],
            b["train_loss"],
            b["lr"],
            b["val_loss"],
        )
    assert resumed["final_val_loss"] == full["final_val_loss"] and resumed["shift_loss"] == full["shift_loss"]
