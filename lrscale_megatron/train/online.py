"""LRScale's online mode inside the trainer: a model-parallel-aware curvature estimator on a held batch."""

from __future__ import annotations

from typing import Any

from lrscale_megatron.parallel import ParallelContext
from lrscale_megatron.train.config import TrainConfig
from lrscale_megatron.train.setup import micro_batches, to_device


def attach_online(engine: Any, cfg: TrainConfig, ctx: ParallelContext, data: Any) -> bool:
    """Give LRScale's online mode a model-parallel-aware curvature estimator on a held batch.

    Attached through :func:`lrscale_megatron.measurement.curvature_estimator` with the DeepSpeed
    engine, so Adam's second moment is read from whatever the engine's optimizer is (torch AdamW, ZeRO-1/2
    flat partitions, ``BF16_Optimizer``, bf16 without ZeRO) and :func:`~lrscale_megatron.measurement.preflight`
    refuses, now rather than at the end of warmup, what cannot be measured (ZeRO-3, a measurement that
    does not fit next to the training step's activations, ...).
    """
    sched = engine.lr_scheduler
    config = getattr(sched, "config", None)
    if config is None or not hasattr(sched, "attach_estimator") or not config.online.enabled:
        return False
    from lrscale_megatron.data import get_batch
    from lrscale_megatron.measurement import online_estimators
    from lrscale_megatron.models.gpt import gpt_loss_fn
    from lrscale_megatron.train.dryrun import GIB, memory_estimate
    from lrscale_megatron.train.setup import param_groups

    held = micro_batches(
        get_batch(data.valid, 0, cfg.training.micro_batch_size), cfg.training.micro_batch_size
    )
    held = [to_device(m) for m in held]
    activations = int(memory_estimate(cfg, ctx.dp_size)["activations"] * GIB)
    # every rank measures together (the products are collective), so no rank-0 broadcast is needed
    online = config.online
    estimator, warmup = online_estimators(
        engine.module,
        gpt_loss_fn,
        held,
        online,
        config.warmup_steps,
        sync=False,
        parallel=ctx,
        optimizer=engine.optimizer,
        engine=engine,
        reserve_bytes=activations,
    )
    # per-group mode: the model parameters of each optimizer group (under ZeRO the optimizer's own
    # groups hold flat partitions, not parameters)
    groups = [g["params"] for g in param_groups(engine.module) if g["params"]]
    sched.attach_estimator(estimator, groups if online.per_group else None, warmup_estimator=warmup)
    return True
