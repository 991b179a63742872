"""Make ``"scheduler": {"type": "LRScale", "params": {...}}`` work in ``deepspeed.initialize``.

DeepSpeed 0.19 has no scheduler registry: ``DeepSpeedEngine._scheduler_from_config`` looks the type
name up with ``getattr(deepspeed.runtime.lr_schedules, name)``. :func:`register` adds ``LRScale`` there
(on every rank, before ``deepspeed.initialize``; idempotent, reversible with :func:`unregister`).

Launch (the config below, saved as ``ds_config.json``)::

    # one process (CPU / one GPU)
    RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python train.py
    # one node
    torchrun --nproc_per_node 8 train.py          # or: deepspeed --num_gpus 8 train.py
    # many nodes
    deepspeed --hostfile hosts --num_nodes 4 --num_gpus 8 train.py

``train.py``::

    import lrscale_megatron          # registers "LRScale" when deepspeed is (or gets) imported
    # or explicitly: lrscale_megatron.integrations.deepspeed.register()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config="ds_config.json")
    # online mode only: Adam's v̂ from the engine's optimizer (ZeRO-1/2 flat partitions, bf16), refusals
    # (ZeRO-3, ...) and the measurement's memory checked now
    lrscale_megatron.integrations.deepspeed.attach_curvature(engine, loss_fn, held_batch)

``ds_config.json`` scheduler block (steps are optimizer iterations)::

    "scheduler": {"type": "LRScale", "params": {
        "law": "steplaw-dense", "model": {"params": 1.2e8, "tokens": 2.5e9, "batch_tokens": 524288},
        "min_lr": 3e-5, "warmup_steps": 2000, "total_steps": 4768, "decay_style": "cosine",
        "online": {"enabled": true, "adapt_every": 200}}}

A client ``lr_scheduler=`` passed to ``deepspeed.initialize`` silently wins over the config's
``"scheduler"`` (DeepSpeed behaviour); do not pass one. Online mode is refused under ZeRO-3 (the
curvature core needs whole parameters) when the curvature is attached.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported in LRScale(): `import lrscale_megatron` must not import torch
    from lrscale_megatron.scheduler import LRScaleScheduler

logger = logging.getLogger(__name__)

SCHEDULER_TYPE = "LRScale"


def LRScale(optimizer: Any, **params: Any) -> LRScaleScheduler:  # noqa: N802 - the DeepSpeed type name
    """Factory DeepSpeed calls as ``LRScale(engine.optimizer, **scheduler_params)``.

    ``engine.optimizer`` is a ZeRO / bf16 wrapper under ZeRO; the torch optimizer inside it is
    taken with ``deepspeed.runtime.lr_schedules.get_torch_optimizer``.
    """
    from deepspeed.runtime.lr_schedules import get_torch_optimizer

    from lrscale_megatron.scheduler import LRScaleConfig, LRScaleScheduler

    config = LRScaleConfig.from_dict(params, where="scheduler.params")
    sched = LRScaleScheduler(get_torch_optimizer(optimizer), config)
    sched.host_optimizer = optimizer  # type: ignore[attr-defined]  # the wrapper: where ZeRO/bf16 keep v̂
    return sched


def attach_curvature(
    engine: Any,
    loss_fn: Any,
    batch: Any,
    *,
    param_groups: Any = None,
    parallel: Any = None,
    sync: bool = False,
    reserve_bytes: int = 0,
) -> None:
    """Attach online curvature to ``engine.lr_scheduler`` (an LRScale scheduler) through
    :func:`lrscale_megatron.measurement.curvature_estimator` with the engine: Adam's second moment from
    whatever the engine's optimizer is (torch Adam/AdamW, ZeRO-1/2 flat partitions, ``BF16_Optimizer``,
    bf16 without ZeRO), and :func:`~lrscale_megatron.measurement.preflight` refusing now what cannot be
    measured (ZeRO-3, MoE, a measurement that will not fit next to ``reserve_bytes``).

    ``batch`` is this rank's part of the held batch; every rank calls this and keeps stepping together
    (the products are collective). ``parallel`` defaults to ``ParallelContext.from_deepspeed(engine)``.
    ``param_groups``: the model parameters of each optimizer group, for ``online.per_group`` (under ZeRO
    the optimizer's own groups hold flat partitions).
    """
    from lrscale_megatron.measurement import online_estimators
    from lrscale_megatron.parallel import ParallelContext
    from lrscale_megatron.preflight import check_layout

    sched = engine.lr_scheduler
    config = getattr(sched, "config", None)
    if config is None or not hasattr(sched, "attach_estimator"):
        raise TypeError(
            f"engine.lr_scheduler is {type(sched).__name__}, not LRScale: set "
            '"scheduler": {"type": "LRScale", ...} in the DeepSpeed config'
        )
    check_layout(engine.module, config.online.hvp, engine=engine)  # ZeRO-3 etc. refused before anything else
    ctx = parallel if parallel is not None else ParallelContext.from_deepspeed(engine, engine.module)
    estimator, warmup = online_estimators(
        engine.module,
        loss_fn,
        batch,
        config.online,
        config.warmup_steps,
        sync=sync,
        parallel=ctx,
        optimizer=engine.optimizer,
        engine=engine,
        reserve_bytes=reserve_bytes,
    )
    sched.attach_estimator(estimator, param_groups, warmup_estimator=warmup)


def register() -> None:
    """Make DeepSpeed resolve ``"type": "LRScale"``. Idempotent; call on every rank before initialize."""
    from deepspeed.runtime import lr_schedules

    current = getattr(lr_schedules, SCHEDULER_TYPE, None)
    if current is LRScale:
        return
    if current is not None:
        raise RuntimeError(
            f"deepspeed.runtime.lr_schedules already defines {SCHEDULER_TYPE!r} "
            f"({current!r}); refusing to overwrite it"
        )
    setattr(lr_schedules, SCHEDULER_TYPE, LRScale)
    if SCHEDULER_TYPE not in lr_schedules.VALID_LR_SCHEDULES:
        lr_schedules.VALID_LR_SCHEDULES.append(SCHEDULER_TYPE)
    logger.info("lrscale: registered DeepSpeed scheduler type %r", SCHEDULER_TYPE)


def unregister() -> None:
    """Undo :func:`register` (no-op if not registered)."""
    from deepspeed.runtime import lr_schedules

    if getattr(lr_schedules, SCHEDULER_TYPE, None) is LRScale:
        delattr(lr_schedules, SCHEDULER_TYPE)
        if SCHEDULER_TYPE in lr_schedules.VALID_LR_SCHEDULES:
            lr_schedules.VALID_LR_SCHEDULES.remove(SCHEDULER_TYPE)


def is_registered() -> bool:
    from deepspeed.runtime import lr_schedules

    return getattr(lr_schedules, SCHEDULER_TYPE, None) is LRScale


_LR_SCHEDULES = "deepspeed.runtime.lr_schedules"


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Runs :func:`register` right after ``deepspeed.runtime.lr_schedules`` is first imported."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _LR_SCHEDULES:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from recursing
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        original = loader.exec_module

        def exec_module(module):
            original(module)
            register()

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def register_on_import() -> None:
    """Register now if DeepSpeed's scheduler module is loaded, else as soon as it is (no DeepSpeed import
    here: ``import lrscale_megatron`` stays cheap). Idempotent."""
    if _LR_SCHEDULES in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
