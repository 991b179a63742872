"""Curvature through a DeepSpeed engine: ZeRO-1/2 with DP=2 equal the unsharded full-batch result;
ZeRO-3 is refused with a message that names the stage and the alternative."""

import json
import os

import pytest

from tests.distributed._launch import torchrun

WORKER = os.path.join(os.path.dirname(__file__), "deepspeed_hvp_worker.py")


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_dp2_matches_unsharded(tmp_path, stage):
    out = tmp_path / "r.json"
    torchrun(2, WORKER, str(stage), str(out))
    r = json.loads(out.read_text())
    assert r["dp_size"] == 2
    assert r["hv_rel_err"] < 1e-5
    assert abs(r["lambda_max"] - r["ref_lambda_max"]) <= 1e-4 * abs(r["ref_lambda_max"])


def test_zero3_is_refused(tmp_path):
    out = tmp_path / "r.json"
    torchrun(2, WORKER, "3", str(out))
    r = json.loads(out.read_text())
    assert "stage 3" in r["error"] and "stage 0, 1 or 2" in r["error"]
