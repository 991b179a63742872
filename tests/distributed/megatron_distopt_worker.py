"""Worker for test_megatron_distopt_moments.py: megatron-core's DistributedOptimizer (fp32 main-param
shards over DP=2, under megatron's DistributedDataParallel with main_grad) against torch AdamW on the
full batch; then the Adam-preconditioned lambda_max through the sharded optimizer.

megatron's DistributedOptimizer / gradient clipping check ``param.type() == "torch.cuda.FloatTensor"``;
on this CPU-only machine ``Tensor.type()`` is made to report the CUDA name while the optimizer is built
and stepped (a test-only shim; nothing else is changed).

    torchrun --nproc_per_node 2 megatron_distopt_worker.py OUT
"""

import contextlib
import json
import sys

import torch
import torch.distributed as dist

from lrscale_megatron.integrations.megatron_cpu import CudaToCpuMode
from lrscale_megatron.launch import init_megatron, shutdown
from lrscale_megatron.measurement import measure_lambda_max, second_moments
from lrscale_megatron.models.gpt import build_gpt, get_preset, gpt_loss_fn
from lrscale_megatron.models.text import byte_batch
from lrscale_megatron.parallel import ParallelContext

LR, B2, EPS, STEPS = 1e-2, 0.95, 1e-8, 3


@contextlib.contextmanager
def cuda_type_names():
    orig = torch.Tensor.type

    def fake(self, *a, **k):
        out = orig(self, *a, **k)
        if a or k or not out.startswith("torch.") or ".cuda." in out:
            return out
        return out.replace("torch.", "torch.cuda.", 1)

    torch.Tensor.type = fake
    try:
        yield
    finally:
        torch.Tensor.type = orig


out_path = sys.argv[1]
ctx = init_megatron(1, 1, seed=0)
rank = dist.get_rank()
preset = get_preset("tiny")
model = build_gpt(preset, ctx, dtype=torch.float32, seed=0)
reference = build_gpt(preset, ctx, dtype=torch.float32, seed=0)  # same weights (init by global name)
assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig  # noqa: E402
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402

ocfg = OptimizerConfig(
    optimizer="adam",
    lr=LR,
    adam_beta2=B2,
    adam_eps=EPS,
    weight_decay=0.0,
    clip_grad=0.0,
    use_distributed_optimizer=True,
)
with CudaToCpuMode(), cuda_type_names():
    ddp = DistributedDataParallel(
        model.config,
        DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True),
        model,
    )
    opt = get_megatron_optimizer(ocfg, [ddp])
ref_opt = torch.optim.AdamW(reference.parameters(), lr=LR, betas=(0.9, B2), eps=EPS, weight_decay=0.0)
batches = [byte_batch(4, preset.seq_length, seed=s) for s in range(STEPS + 1)]


def half(b, r):
    return {k: v[r * 2 : (r + 1) * 2] for k, v in b.items()}


for b in batches[:STEPS]:
    with CudaToCpuMode(), cuda_type_names():
        ddp.zero_grad_buffer()
        opt.zero_grad()
        gpt_loss_fn(ddp, half(b, rank)).backward()
        ddp.finish_grad_sync()
        ok, _, _ = opt.step()
    assert ok
    ref_opt.zero_grad()
    gpt_loss_fn(reference, b).backward()
    ref_opt.step()

params = [p for p in ddp.module.parameters() if p.requires_grad]
ref_params = [p for p in reference.parameters() if p.requires_grad]
subs = getattr(opt, "chained_optimizers", [opt])
result = {
    "optimizer": type(opt).__name__,
    "sub_optimizers": [type(s).__name__ for s in subs],
    "owned_shards": sum(
        len(s.model_param_group_index_map) for s in subs if hasattr(s, "model_param_group_index_map")
    ),
    "n_params": len(params),
}
v_hat, eps = second_moments(opt, params)
ref_v, _ = second_moments(ref_opt, ref_params)
result["eps"] = eps
result["v_rel_err"] = max(float((a - b).norm() / b.norm()) for a, b in zip(v_hat, ref_v))
held = batches[STEPS]
kw = {"mode": "exact", "max_iter": 40, "tol": 1e-4}
est = measure_lambda_max(ddp.module, gpt_loss_fn, half(held, rank), parallel=ctx, optimizer=opt, **kw)
result.update(lambda_max=est.lambda_max, converged=est.converged)
if rank == 0:
    ref = measure_lambda_max(
        reference, gpt_loss_fn, held, parallel=ParallelContext.single(), optimizer=ref_opt, **kw
    )
    result.update(ref_lambda_max=ref.lambda_max, ref_converged=ref.converged)
    with open(out_path, "w") as f:
        json.dump(result, f)
del ddp, opt
shutdown()
