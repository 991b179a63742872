"""Worker for test_deepspeed_hvp.py: HVP through a real DeepSpeed engine (ZeRO stage from argv) with
data parallelism; each rank holds half of the batch. Rank 0 also computes the unsharded full-batch
reference on a private copy of the model.
    torchrun --nproc_per_node 2 deepspeed_hvp_worker.py STAGE OUT
"""

import copy
import json
import sys

import deepspeed
import torch
import torch.distributed as dist

import lrscale_megatron  # noqa: F401  (registers LRScale)
from lrscale_megatron.curvature import HessianOperator, lanczos
from lrscale_megatron.models.torch_gpt import TorchGPT, TorchGPTConfig, torch_gpt_loss
from lrscale_megatron.parallel import ParallelContext

deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
stage, out_path = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
model = TorchGPT(TorchGPTConfig(vocab_size=32, seq_length=8, hidden_size=16, num_layers=1, num_heads=2))
model.init_weights(0)
reference_model = copy.deepcopy(model)
cfg = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
    "zero_optimization": {"stage": stage},
}
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
rank = dist.get_rank()
g = torch.Generator().manual_seed(1)
tok = torch.randint(0, 32, (4, 9), generator=g)
full = {"tokens": tok[:, :-1], "labels": tok[:, 1:]}
local = {k: v[rank * 2 : (rank + 1) * 2] for k, v in full.items()}
result: dict = {"stage": stage}
try:
    ctx = ParallelContext.from_deepspeed(engine)
    result["dp_size"] = ctx.dp_size
    op = HessianOperator(engine.module, torch_gpt_loss, local, parallel=ctx)
    v = op.backend.randn(7)
    hv = op.matvec(v)
    result["lambda_max"] = lanczos(op, k=1, max_iter=30, tol=1e-6, seed=0).eigenvalues[0]
    if rank == 0:
        ref_op = HessianOperator(reference_model, torch_gpt_loss, full)
        ref_hv = ref_op.matvec(v)
        result["hv_rel_err"] = max(float((a - b).norm() / b.norm()) for a, b in zip(hv, ref_hv))
        result["ref_lambda_max"] = lanczos(ref_op, k=1, max_iter=30, tol=1e-6, seed=0).eigenvalues[0]
except ValueError as e:
    result["error"] = str(e)
if rank == 0:
    with open(out_path, "w") as f:
        json.dump(result, f)
del engine
import gc  # noqa: E402

gc.collect()
dist.barrier()
dist.destroy_process_group()
