"""Worker for test_deepspeed_moments.py: Adam's v̂ read from real DeepSpeed engines' optimizers
(ZeRO-1/2 flat partitions, BF16_Optimizer, FP16_UnfusedOptimizer-in-bf16) with DP=2, against an
identical torch AdamW run on the full batch (one process's view) and against DeepSpeed's own
per-parameter reader; then the Adam-preconditioned lambda_max through the engine against the torch
reference. One engine per variant, one after the other in the same processes.

    torchrun --nproc_per_node 2 deepspeed_moments_worker.py VARIANT[,VARIANT...] OUT
"""

import copy
import gc
import json
import sys

import deepspeed
import torch
import torch.distributed as dist

from lrscale_megatron.adapter import OnlineConfig
from lrscale_megatron.curvature import HessianOperator, lanczos
from lrscale_megatron.measurement import measure_lambda_max, preflight, second_moments
from lrscale_megatron.models.torch_gpt import TorchGPT, TorchGPTConfig, torch_gpt_loss
from lrscale_megatron.parallel import ParallelContext

STEPS, LR, BETAS, EPS = 3, 1e-2, (0.9, 0.95), 1e-8

VARIANTS = {
    "zero1": {"zero_optimization": {"stage": 1}},
    "zero2": {"zero_optimization": {"stage": 2}},
    "bf16_zero1": {"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}},
    "bf16_zero2": {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}},
    # bf16 parameters, fp32 gradient accumulation, ZeRO-1: DeepSpeed's BF16_Optimizer
    "bf16_optimizer": {
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 1},
        "data_types": {"grad_accum_dtype": "fp32"},
    },
    # bf16 without ZeRO: FP16_UnfusedOptimizer holding one fp32 copy per parameter
    "bf16_zero0": {"bf16": {"enabled": True}, "zero_optimization": {"stage": 0}},
}
# integrations.deepspeed.attach_curvature on an engine whose scheduler is LRScale (online)
SCHED = {
    "bf16_zero1_sched": {"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}},
    "zero3_sched": {"zero_optimization": {"stage": 3}},
}
LRSCALE = {
    "type": "LRScale",
    "params": {
        "peak_lr": LR,
        "warmup_steps": STEPS,
        "total_steps": 100,
        "online": {
            "enabled": True,
            "adapt_every": 100,
            "hvp": "exact",
            "max_iter": 40,
            "tol": 1e-4,
            # one measurement, at the end of warmup, whose gauge is far above the edge: a cut
            "warmup_checks": 0,
            "start_step": STEPS,
            "rule": "inverse",
            "eta_base": 1e-6,
        },
    },
}


def split(tok, r=None):
    full = {"tokens": tok[:, :-1], "labels": tok[:, 1:]}
    return full if r is None else {k: v[r * 2 : (r + 1) * 2] for k, v in full.items()}


def two_groups(model):
    """Two param groups, as the trainer has (decay / no decay)."""
    return [
        {"params": [p for p in model.parameters() if p.ndim >= 2]},
        {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0},
    ]


def run_sched(variant: str) -> dict:
    """attach_curvature through the DeepSpeed integration: one measurement at the end of warmup."""
    import lrscale_megatron.integrations.deepspeed as lrs_ds
    from lrscale_megatron.measurement import MeasurementRefused

    lrs_ds.register()
    torch.manual_seed(0)
    model = TorchGPT(TorchGPTConfig(vocab_size=32, seq_length=8, hidden_size=16, num_layers=1, num_heads=2))
    model.init_weights(0)
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": list(BETAS), "torch_adam": True}},
        "scheduler": LRSCALE,
        **SCHED[variant],
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=two_groups(model), config=cfg)
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 32, (4, 9), generator=g) for _ in range(STEPS + 1)]
    result: dict = {"variant": variant}
    try:
        lrs_ds.attach_curvature(engine, torch_gpt_loss, split(batches[STEPS], rank))
    except MeasurementRefused as e:
        result["error"] = str(e)
    else:
        for tok in batches[:STEPS]:
            engine.backward(torch_gpt_loss(engine, split(tok, rank)))
            engine.step()
        result["history"] = engine.lr_scheduler.history
        result["host_optimizer"] = type(engine.lr_scheduler.host_optimizer).__name__
    del engine
    gc.collect()
    dist.barrier()
    return result


def run(variant: str) -> dict:
    if variant in SCHED:
        return run_sched(variant)
    torch.manual_seed(0)
    model = TorchGPT(TorchGPTConfig(vocab_size=32, seq_length=8, hidden_size=16, num_layers=1, num_heads=2))
    model.init_weights(0)
    reference = copy.deepcopy(model)
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": LR, "betas": list(BETAS), "eps": EPS, "torch_adam": True},
        },
        **VARIANTS[variant],
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=two_groups(model), config=cfg)
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 32, (4, 9), generator=g) for _ in range(STEPS + 1)]
    ref_opt = torch.optim.AdamW(two_groups(reference), lr=LR, betas=BETAS, eps=EPS)
    # FP16_UnfusedOptimizer creates its Adam state with one step on zero gradients: mirror it
    inner_state = engine.optimizer.optimizer.state if hasattr(engine.optimizer, "optimizer") else {}
    prestep = any("step" in st for st in inner_state.values())
    if prestep:
        for p in reference.parameters():
            p.grad = torch.zeros_like(p)
        ref_opt.step()
    for tok in batches[:STEPS]:
        loss = torch_gpt_loss(engine, split(tok, rank))
        engine.backward(loss)
        engine.step()
        ref_opt.zero_grad()
        torch_gpt_loss(reference, split(tok)).backward()
        ref_opt.step()

    result: dict = {"variant": variant, "optimizer": type(engine.optimizer).__name__, "prestep": prestep}
    params = [p for p in engine.module.parameters() if p.requires_grad]
    ref_params = [p for p in reference.parameters() if p.requires_grad]
    v_hat, eps = second_moments(engine, params)
    # what a DeepSpeed scheduler holds: the torch optimizer inside the wrapper (flat partitions)
    from deepspeed.runtime.lr_schedules import get_torch_optimizer

    if any(hasattr(p, "_hp_mapping") for p in params):
        v_inner, _ = second_moments(get_torch_optimizer(engine.optimizer), params)
        result["inner_equal"] = all(torch.equal(a, b) for a, b in zip(v_inner, v_hat))
    ref_v, ref_eps = second_moments(ref_opt, ref_params)
    result["eps"], result["ref_eps"] = eps, ref_eps
    result["v_rel_err"] = max(float((a - b).norm() / b.norm()) for a, b in zip(v_hat, ref_v))
    result["v_shapes_ok"] = all(
        a.shape == p.shape and a.dtype == torch.float32 for a, p in zip(v_hat, params)
    )
    # DeepSpeed's own per-parameter reader (one all-reduce per parameter) where it applies; link the
    # optimizer state fragments first (DeepSpeed does it lazily, at checkpoint time)
    lp_groups = getattr(engine.optimizer, "bit16_groups", None) or getattr(
        engine.optimizer, "bf16_groups", None
    )
    if lp_groups is not None:
        from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

        inner = engine.optimizer.optimizer
        for i, lps in enumerate(lp_groups):
            lazy_init_hp_params_optimizer_state(lps, inner.param_groups[i]["params"][0], inner.state)
        ds_full = [deepspeed.utils.safe_get_full_optimizer_state(p, "exp_avg_sq") for p in params]
        ds_v = [x / (1 - BETAS[1] ** STEPS) for x in ds_full]
        result["v_rel_err_deepspeed_api"] = max(float((a - b).norm() / b.norm()) for a, b in zip(v_hat, ds_v))
    # the measurement itself: preflight, then the preconditioned lambda_max on the held batch
    online = OnlineConfig(enabled=True, hvp="exact", max_iter=40, tol=1e-4)
    mem = preflight(engine.module, engine.optimizer, online, engine=engine)
    result["memory_bytes_per_param"] = mem.bytes_per_param
    ctx = ParallelContext.from_deepspeed(engine)
    held = batches[STEPS]
    kw = {"mode": "exact", "max_iter": 40, "tol": 1e-4}
    est = measure_lambda_max(
        engine.module, torch_gpt_loss, split(held, rank), parallel=ctx, optimizer=engine, **kw
    )
    result.update(lambda_max=est.lambda_max, converged=est.converged, reason=est.reason)
    if rank == 0:
        single = ParallelContext.single()
        ref = measure_lambda_max(
            reference, torch_gpt_loss, split(held), parallel=single, optimizer=ref_opt, **kw
        )
        result.update(ref_lambda_max=ref.lambda_max, ref_converged=ref.converged)
        raw = lanczos(HessianOperator(reference, torch_gpt_loss, split(held)), k=1, max_iter=40, tol=1e-4)
        result["ref_raw_lambda_max"] = float(raw.eigenvalues[0])
    del engine, v_hat
    gc.collect()
    dist.barrier()
    return result


deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
variants, out_path = sys.argv[1].split(","), sys.argv[2]
results = {v: run(v) for v in variants}
if dist.get_rank() == 0:
    with open(out_path, "w") as f:
        json.dump(results, f)
gc.collect()
dist.barrier()
dist.destroy_process_group()
