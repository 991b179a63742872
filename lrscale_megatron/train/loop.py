"""The pretraining loop: :func:`train` (config -> :class:`TrainResult`), usable in-process and repeatedly.

    from lrscale_megatron.train import load_config, train
    result = train(load_config("configs/gpt/cpu-tiny.json", ["training.steps=20"]))
    result.history[-1].train_loss, result.final_val_loss, result.shift_loss

Process groups: the first call starts ``torch.distributed`` (from torchrun / DeepSpeed launcher env vars,
or one local process) and megatron ``parallel_state``; both stay up for later calls, so a comparison job
can call :func:`train` once per arm in one process (a call with another tp/pp re-initialises
``parallel_state``; the world size is fixed). Call :func:`lrscale_megatron.launch.shutdown` at exit.
Each call builds its own model, engine and data iterators, seeds every RNG from ``training.seed`` and
frees the engine before returning, so two calls with one config give identical histories.

How a step runs depends on pipeline parallelism (see :mod:`.setup`): through the DeepSpeed engine when
``pp == 1``; through megatron's 1F1B schedule plus the loop's own gradient reductions and ``engine.step()``
(ZeRO 0) when ``pp > 1``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import random
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lrscale_megatron.parallel import ParallelContext
from lrscale_megatron.train import checkpoint as ckpt
from lrscale_megatron.train.config import TrainConfig
from lrscale_megatron.train.metrics import MetricsWriter, mfu
from lrscale_megatron.train.online import attach_online
from lrscale_megatron.train.results import StepRecord, TrainResult
from lrscale_megatron.train.setup import (
    build_data,
    build_model,
    deepspeed_config,
    initialize_engine,
    micro_batches,
    to_device,
)

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ setup
def init_parallel(cfg: TrainConfig) -> ParallelContext:
    """Process group + megatron ``parallel_state`` for ``cfg.parallel`` (re-initialised if tp/pp changed)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from lrscale_megatron.launch import init_megatron, init_process_group

    init_process_group()
    p = cfg.parallel
    p.resolve_dp(dist.get_world_size())
    if ps.model_parallel_is_initialized() and (
        ps.get_tensor_model_parallel_world_size() != p.tp
        or ps.get_pipeline_model_parallel_world_size() != p.pp
    ):
        ps.destroy_model_parallel()
    return init_megatron(p.tp, p.pp, seed=cfg.training.seed)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------ steps
def _cpu_mode() -> contextlib.AbstractContextManager:
    if torch.cuda.is_available():
        return contextlib.nullcontext()
    from lrscale_megatron.integrations.megatron_cpu import CudaToCpuMode

    return CudaToCpuMode()


def run_schedule(
    module: torch.nn.Module, micro: Sequence[dict[str, torch.Tensor]], seq_length: int, forward_only: bool
) -> list[float]:
    """megatron's ``get_forward_backward_func`` over ``micro``; per-micro-batch losses on the last stage."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from lrscale_megatron.models.gpt import gpt_loss_fn

    def loss_func(out: torch.Tensor):
        # clone: megatron divides ``out`` in place by num_microbatches after this returns
        return out, {"loss": out.detach().clone()}

    def forward_step(data_iterator, model):
        return gpt_loss_fn(model, next(data_iterator)), loss_func

    fb = get_forward_backward_func()
    grad = torch.no_grad() if forward_only else contextlib.nullcontext()
    with _cpu_mode(), grad:
        out = fb(
            forward_step_func=forward_step,
            data_iterator=iter([to_device(m) for m in micro]),
            model=[module],
            num_microbatches=len(micro),
            seq_length=seq_length,
            micro_batch_size=micro[0]["tokens"].shape[0],
            forward_only=forward_only,
        )
    return [float(d["loss"]) for d in out]


def _engine_step(engine: Any, micro: Sequence[dict[str, torch.Tensor]]) -> list[float]:
    """``pp == 1``: DeepSpeed runs forward, backward (DP reduction / ZeRO), clipping, optimizer, scheduler."""
    from lrscale_megatron.models.gpt import gpt_loss_fn

    losses = []
    for mb in micro:
        loss = gpt_loss_fn(engine, to_device(mb))
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    return losses


def _pipeline_step(
    engine: Any, micro: Sequence[dict[str, torch.Tensor]], ctx: ParallelContext, seq_length: int, clip: float
) -> list[float]:
    """``pp > 1``: 1F1B through megatron, then tied-embedding sum, DP mean, clipping, ``engine.step()``."""
    module = engine.module
    losses = run_schedule(module, micro, seq_length, forward_only=False)
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    for _, p in named:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for _, p in named]
    ctx.sum_tied_embeddings(grads, ctx.tied_embedding_indices(named))
    ctx.average_data_parallel(grads)
    if clip > 0:
        norm = grad_norm(named, ctx)
        coef = clip / (norm + 1e-6)  # DeepSpeed's / megatron's clip rule
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
    engine.step()
    return losses


def grad_norm(named: Sequence[tuple[str, torch.Tensor]], ctx: ParallelContext) -> float:
    """Global L2 norm of the gradients: each TP shard once, TP-replicated tensors on tp rank 0 only, the
    last stage's tied-embedding copy never; one all-reduce over the model-parallel group (megatron's
    ``get_grad_norm_fp32`` pattern). Call after the data-parallel mean."""
    specs = ctx.param_specs(list(named))
    total = torch.zeros(1, dtype=torch.float64, device=named[0][1].device if named else "cpu")
    for (_, p), spec in zip(named, specs):
        if spec.owned and p.grad is not None:
            total += p.grad.detach().to(torch.float64).pow(2).sum()
    ctx.all_reduce_model_parallel(total)
    return float(total.sqrt().item())


def evaluate(module: torch.nn.Module, dataset: Any, cfg: TrainConfig, ctx: ParallelContext) -> float:
    """Mean loss over the first ``training.eval_batches`` global batches of ``dataset`` (all ranks agree)."""
    from lrscale_megatron.data import get_batch

    t = cfg.training
    was_training = module.training
    module.eval()
    losses: list[float] = []
    try:
        for i in range(t.eval_batches):
            batch = get_batch(dataset, i, t.global_batch_size, ctx.dp_rank, ctx.dp_size)
            micro = micro_batches(batch, t.micro_batch_size)
            if cfg.model.arch != "gpt":  # plain-PyTorch models (pp = 1): no megatron schedule
                from lrscale_megatron.models.gpt import gpt_loss_fn

                with torch.no_grad():
                    losses += [float(gpt_loss_fn(module, to_device(mb))) for mb in micro]
                continue
            losses += run_schedule(module, micro, cfg.model.seq_length, forward_only=True)
    finally:
        module.train(was_training)
    local = sum(losses) / len(losses) if losses else 0.0
    return ctx.reduce_loss(local)


# ------------------------------------------------------------------------------------------ train
def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) the pretraining job described by ``cfg``; see the module docstring."""
    import torch.distributed as dist

    from lrscale_megatron.data import get_batch
    from lrscale_megatron.energy import EnergyMeter

    ctx = init_parallel(cfg)
    t, m = cfg.training, cfg.model
    _seed_all(t.seed)
    model = build_model(cfg, ctx)
    from lrscale_megatron.megatron_state import layer_offset

    ctx.layer_offset = layer_offset(model)
    data = build_data(cfg, ctx)
    ds_config, clip = deepspeed_config(cfg, ctx.dp_size)
    engine = initialize_engine(model, ds_config)
    if ctx.dp_size == 1 and not cfg.pipeline and engine.zero_optimization_stage() == 0:
        # no data-parallel peer: skip DeepSpeed's all-reduce (it also refuses float64 gradients on CPU)
        engine.enable_backward_allreduce = False
    sched_type = (ds_config.get("scheduler") or {}).get("type")
    rank0 = dist.get_rank() == 0
    tokens_per_step = t.global_batch_size * m.seq_length
    history: list[StepRecord] = []
    start, wall = 0, 0.0
    if cfg.checkpoint.load:
        client = ckpt.load(engine, cfg.checkpoint.load)
        start, wall = int(client["step"]), float(client["wall_s"])
        history = [StepRecord(**r) for r in client["history"]]
        if start > t.steps:
            raise ValueError(f"checkpoint.load is at step {start}, beyond training.steps={t.steps}")
    online = attach_online(engine, cfg, ctx, data)
    writer = MetricsWriter(t.output_dir, enabled=rank0, resume=bool(cfg.checkpoint.load))
    logger.info(
        "train %s: %d params, %s, scheduler=%s, %s path, steps %d..%d",
        m.name,
        m.num_params(),
        ctx.describe(),
        sched_type,
        "pipeline-schedule" if cfg.pipeline else "engine",
        start + 1,
        t.steps,
    )
    meter = EnergyMeter([torch.cuda.current_device()] if torch.cuda.is_available() else None).start()
    last_ckpt: str | None = None
    call_wall = 0.0
    engine.train()
    try:
        for step in range(start, t.steps):
            lr = float(engine.get_lr()[0])
            n_adapt = len(getattr(engine.lr_scheduler, "history", []) or [])
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            micro = micro_batches(
                get_batch(data.train, step, t.global_batch_size, ctx.dp_rank, ctx.dp_size), t.micro_batch_size
            )
            if cfg.pipeline:
                losses = _pipeline_step(engine, micro, ctx, m.seq_length, clip)
            else:
                losses = _engine_step(engine, micro)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            wall += dt
            call_wall += dt
            loss = ctx.reduce_loss(sum(losses) / len(losses) if losses else 0.0)
            done = step + 1
            val = None
            if (t.eval_every and done % t.eval_every == 0) or done == t.steps:
                val = evaluate(engine.module, data.valid, cfg, ctx)
            lam = None
            if online:
                new = (getattr(engine.lr_scheduler, "history", []) or [])[n_adapt:]
                if new:
                    lam = float(new[-1].get("lambda_max", math.nan))
            rec = StepRecord(
                step=done,
                tokens=done * tokens_per_step,
                wall_s=wall,
                train_loss=loss,
                lr=lr,
                val_loss=val,
                lambda_max=lam,
            )
            history.append(rec)
            tps = tokens_per_step / dt if dt > 0 else 0.0
            writer.write(
                {
                    **dataclasses.asdict(rec),
                    "tokens_per_s": tps,
                    "mfu": mfu(m.num_params(), tps, t.peak_flops_per_device, ctx.world_size),
                }
            )
            if done % t.log_every == 0 or done == t.steps:
                logger.info(
                    "step %d/%d loss %.6f lr %.4g%s %.0f tok/s",
                    done,
                    t.steps,
                    loss,
                    lr,
                    f" val {val:.6f}" if val is not None else "",
                    tps,
                )
            c = cfg.checkpoint
            if c.dir and ((c.save_every and done % c.save_every == 0) or done == t.steps):
                client = {"step": done, "wall_s": wall, "history": [dataclasses.asdict(r) for r in history]}
                last_ckpt = str(ckpt.save(engine, c.dir, done, client))
        reading = meter.stop()
        energy = _sum_energy(reading.energy_j if reading.available else None)
        final_val = evaluate(engine.module, data.valid, cfg, ctx)
        shift = evaluate(engine.module, data.shift, cfg, ctx) if data.shift is not None else None
        lambada = None
        if data.lambada:
            from lrscale_megatron.train.downstream import last_word_accuracy

            with _cpu_mode():
                lambada = last_word_accuracy(engine.module, data.lambada, tp_size=ctx.tp_size)
            lambada["source"] = data.lambada_source
        adaptations = tuple(dict(h) for h in (getattr(engine.lr_scheduler, "history", []) or []))
    finally:
        writer.close()
        del engine, model
        gc.collect()
    ran = t.steps - start
    tps = ran * tokens_per_step / call_wall if call_wall > 0 else 0.0
    logger.info(
        "done: final val %.6f%s%s, %.0f tok/s",
        final_val,
        f", shift {shift:.6f}" if shift is not None else "",
        f", last-word acc {lambada['accuracy']:.3f} ({lambada['n']} passages)" if lambada else "",
        tps,
    )
    return TrainResult(
        history=tuple(history),
        final_val_loss=final_val,
        shift_loss=shift,
        steps=t.steps,
        tokens=t.steps * tokens_per_step,
        wall_s=wall,
        tokens_per_s=tps,
        mfu=mfu(m.num_params(), tps, t.peak_flops_per_device, ctx.world_size),
        energy_j=energy,
        num_params=m.num_params(),
        layout={"tp": ctx.tp_size, "pp": ctx.pp_size, "dp": ctx.dp_size, "world_size": ctx.world_size},
        scheduler=sched_type,
        adaptations=adaptations,
        checkpoint=last_ckpt,
        config=cfg.to_dict(),
        lambada=lambada,
    )


def _sum_energy(local: float | None) -> float | None:
    """Sum of the ranks' energies, ``None`` if any rank could not measure."""
    import torch.distributed as dist

    t = torch.tensor(
        [local if local is not None else 0.0, 0.0 if local is not None else 1.0], dtype=torch.float64
    )
    if dist.is_initialized() and dist.get_world_size() > 1:
        if torch.cuda.is_available():
            t = t.cuda()
        dist.all_reduce(t)
    return None if t[1].item() > 0 else float(t[0].item())
