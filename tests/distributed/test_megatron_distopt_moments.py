"""Adam's v̂ from megatron-core's DistributedOptimizer (fp32 main-param shards over DP=2, megatron DDP
with main_grad) equals torch AdamW's on the full batch; the preconditioned lambda_max through the
sharded optimizer equals the reference's."""

import json
import os

from tests.distributed._launch import torchrun

WORKER = os.path.join(os.path.dirname(__file__), "megatron_distopt_worker.py")


def test_distributed_optimizer_shards_equal_torch_adamw(tmp_path):
    out = tmp_path / "r.json"
    torchrun(2, WORKER, str(out))
    r = json.loads(out.read_text())
    assert "DistributedOptimizer" in r["sub_optimizers"]
    assert 0 < r["owned_shards"] < 2 * r["n_params"]  # sharded: rank 0 does not own every parameter whole
    assert r["v_rel_err"] < 1e-5 and r["eps"] == 1e-8
    assert r["converged"] and r["ref_converged"]
    assert abs(r["lambda_max"] - r["ref_lambda_max"]) <= 1e-4 * r["ref_lambda_max"]
