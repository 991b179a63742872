"""Refuse up front what an online curvature measurement cannot measure, and size its memory.

:func:`preflight` runs when the estimator is attached (before training), so a layout the curvature
core cannot measure fails then, naming the setting and the fix, not at the end of warmup:

=============================  =====================  ==========================================
setting                        ``hvp="fd"``           ``hvp="exact"``
=============================  =====================  ==========================================
ZeRO-3                         refused                refused (parameters are partitioned)
expert / context / virtual PP  refused                refused (no sharding-aware products)
sequence parallel              refused                refused (LayerNorm/bias gradients are
                                                      per-sequence-shard partial sums)
activation recompute           with ``grad_fn`` only  refused (the recomputed backward runs
                               (megatron's schedule:  outside autograd: a double backward drops
                               ``.backward()``)       it; ``autograd.grad`` is refused by
                                                      megatron's checkpoint)
=============================  =====================  ==========================================

Memory: :func:`measurement_memory` (:mod:`lrscale_megatron.memory_plan`, re-exported here).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from lrscale_megatron.memory_plan import (  # noqa: F401  (re-exported)
    EXACT_FP32_VECTORS,
    FD_ANCHOR_VECTORS,
    FD_HOST_SIDE_VECTORS,
    FD_HOST_VECTORS,
    FD_VECTORS,
    GIB,
    PRECONDITION_VECTORS,
    MeasurementMemory,
    measurement_memory,
)

logger = logging.getLogger(__name__)

FREE_MEMORY_MARGIN = 0.9  # refuse when the measurement needs more than this share of free memory


class MeasurementRefused(ValueError):
    """An online measurement that cannot be made in this setting: names the setting, why, and the fix."""

    def __init__(self, setting: str, value: Any, problem: str, fix: str) -> None:
        self.setting, self.value, self.problem, self.fix = setting, value, problem, fix
        super().__init__(f"online curvature: {setting}={value!r}: {problem}. Fix: {fix}")


# ------------------------------------------------------------------------------------------ checks
def _unwrap(model: Any) -> Any:
    seen = 0
    while hasattr(model, "module") and seen < 8:
        model = model.module
        seen += 1
    return model


def _megatron_config(model: Any) -> Any:
    return getattr(_unwrap(model), "config", None)


def _ps_size(getter: str) -> int:
    try:
        from megatron.core import parallel_state as ps
    except ImportError:
        return 1
    if not ps.model_parallel_is_initialized():
        return 1
    fn = getattr(ps, getter, None)
    value = fn() if fn is not None else None
    return int(value) if value else 1


def check_layout(model: Any, mode: str, *, engine: Any = None, grad_fn: Any = None) -> None:
    """Raise :class:`MeasurementRefused` for layouts the curvature core cannot measure (module docstring)."""
    if isinstance(model, (list, tuple, torch.nn.ModuleList)) and len(model) > 1:
        raise MeasurementRefused(
            "virtual_pipeline_model_parallel_size",
            len(model),
            "interleaved (virtual) pipeline chunks are not supported by the curvature core",
            "train without virtual pipeline stages, or online.enabled=false",
        )
    stage = engine.zero_optimization_stage() if engine is not None else 0
    params = list(_unwrap(model).parameters()) if hasattr(_unwrap(model), "parameters") else []
    if stage >= 3 or any(hasattr(p, "ds_id") for p in params):
        raise MeasurementRefused(
            "zero_optimization.stage",
            stage or 3,
            "ZeRO-3 partitions the parameters themselves; the curvature core needs whole parameters",
            "use ZeRO stage 0, 1 or 2 with online adaptation",
        )
    cfg = _megatron_config(model)
    ep = max(
        _ps_size("get_expert_model_parallel_world_size"),
        int(getattr(cfg, "expert_model_parallel_size", 1) or 1),
    )
    if getattr(engine, "has_moe_layers", False) or ep > 1 or getattr(cfg, "num_moe_experts", None):
        raise MeasurementRefused(
            "expert parallel / MoE",
            ep,
            "mixture-of-experts layers are not supported by the curvature core",
            "use a dense model, or online.enabled=false",
        )
    cp = max(_ps_size("get_context_parallel_world_size"), int(getattr(cfg, "context_parallel_size", 1) or 1))
    if cp > 1:
        raise MeasurementRefused(
            "context_parallel_size",
            cp,
            "context parallelism splits sequences over ranks; products do not reduce over that group",
            "use context_parallel_size=1, or online.enabled=false",
        )
    vpp = max(
        _ps_size("get_virtual_pipeline_model_parallel_world_size"),
        int(getattr(cfg, "virtual_pipeline_model_parallel_size", 1) or 1),
    )
    if vpp > 1:
        raise MeasurementRefused(
            "virtual_pipeline_model_parallel_size",
            vpp,
            "interleaved (virtual) pipeline chunks are not supported by the curvature core",
            "train without virtual pipeline stages, or online.enabled=false",
        )
    if getattr(cfg, "sequence_parallel", False):
        raise MeasurementRefused(
            "sequence_parallel",
            True,
            "LayerNorm and bias gradients are partial sums over sequence shards (megatron all-reduces them "
            "in its own step), so products would be silently wrong in fd and exact mode",
            "train with sequence_parallel=false, or online.enabled=false",
        )
    recompute = getattr(cfg, "recompute_granularity", None)
    if recompute is None and engine is not None:
        ac = getattr(getattr(engine, "_config", None), "activation_checkpointing_config", None)
        if ac is not None and getattr(ac, "partition_activations", False):
            recompute = "deepspeed activation_checkpointing"
    if recompute is not None and mode == "exact":
        raise MeasurementRefused(
            "recompute_granularity",
            recompute,
            "recomputed activations are differentiated by a backward autograd cannot see, so a double "
            "backward silently drops that path",
            "use online.hvp='fd' (with grad_fn=schedule_grad_fn(...)), or turn activation recompute off",
        )
    if recompute is not None and grad_fn is None:
        raise MeasurementRefused(
            "recompute_granularity",
            recompute,
            "megatron's checkpoint refuses torch.autograd.grad, which the fd products use by default",
            "pass grad_fn=lrscale_megatron.integrations.megatron_schedule.schedule_grad_fn(...) "
            "(gradients through megatron's own schedule), or turn activation recompute off",
        )


def check_optimizer(optimizer: Any, precondition: bool) -> None:
    """With ``precondition``, the optimizer must be Adam-type (its second moment is the preconditioner)."""
    if not precondition:
        return
    if optimizer is None:
        raise MeasurementRefused(
            "online.precondition",
            True,
            "no optimizer was given, so the Adam preconditioner (the quantity the eos bound is stated for) "
            "cannot be read",
            "pass the optimizer (or the DeepSpeed engine), or online.precondition=false with rule='inverse'",
        )
    chain: list[Any] = []
    opt = optimizer
    while opt is not None and len(chain) < 5:  # DeepSpeed / megatron wrappers keep it in .optimizer
        chain.append(opt)
        opt = getattr(opt, "optimizer", None)
    adam = [
        o for o in chain if getattr(o, "param_groups", None) and all("betas" in g for g in o.param_groups)
    ]
    if not adam:
        raise MeasurementRefused(
            "online.precondition",
            True,
            f"optimizer {type(chain[-1]).__name__} is not Adam-type (no 'betas'): it keeps no second moment",
            "use Adam/AdamW, or online.precondition=false with online.rule='inverse'",
        )


def _local_numel_and_bytes(model: Any) -> tuple[int, int]:
    params = [p for p in _unwrap(model).parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    return n, (params[0].element_size() if params else 4)


def preflight(
    model: Any,
    optimizer: Any,
    online_cfg: Any,
    *,
    engine: Any = None,
    parallel: Any = None,
    batch: Any = None,
    grad_fn: Any = None,
    activation_bytes: int = 0,
    reserve_bytes: int = 0,
    free_bytes: int | None = None,
) -> MeasurementMemory:
    """Refuse (:class:`MeasurementRefused`) what cannot be measured; return the measurement's memory.

    On CUDA, also refuse when the estimate exceeds ``FREE_MEMORY_MARGIN`` of the device's free memory
    (``free_bytes``, default: ``torch.cuda.mem_get_info`` plus the allocator's cached blocks) minus
    ``reserve_bytes`` (what the training step still needs, e.g. its activations). On CPU the fit is not
    checked unless ``free_bytes`` is given; the estimate is still returned. ``online.vectors="auto"`` is
    resolved here: ``"host"`` for an fd measurement of a bf16/fp16 model whose device plan does not fit,
    else ``"device"`` (the returned :attr:`MeasurementMemory.vectors`). ``parallel`` and ``batch`` are
    accepted for the scheduler's call signature.
    """
    del parallel, batch
    mode = online_cfg.hvp
    check_layout(model, mode, engine=engine, grad_fn=grad_fn)
    opt = optimizer if optimizer is not None else getattr(engine, "optimizer", None)
    check_optimizer(opt, bool(online_cfg.precondition))
    n, pbytes = _local_numel_and_bytes(model)
    vectors, split = getattr(online_cfg, "vectors", "device"), int(getattr(online_cfg, "batch_split", 1))
    check_placement(mode, pbytes, vectors, split, grad_fn)

    def plan(where: str) -> MeasurementMemory:
        return measurement_memory(
            n,
            mode=mode,
            param_bytes=pbytes,
            precondition=bool(online_cfg.precondition),
            activation_bytes=activation_bytes,
            vectors=where,
            batch_split=split,
        )

    first = next((p for p in _unwrap(model).parameters()), None)
    if free_bytes is None and first is not None and first.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(first.device)
        free_bytes = (
            free + torch.cuda.memory_reserved(first.device) - torch.cuda.memory_allocated(first.device)
        )
    available = None if free_bytes is None else FREE_MEMORY_MARGIN * free_bytes - reserve_bytes
    if vectors == "auto":  # host vectors only where they apply and the device plan will not fit
        device_fits = available is None or plan("device").total_bytes <= available
        vectors = "host" if (mode == "fd" and pbytes < 4 and not device_fits) else "device"
    mem = plan(vectors)
    if available is not None and mem.total_bytes > available:
        raise MeasurementRefused(
            "online.hvp",
            mode,
            f"the measurement needs {mem.total_bytes / GIB:.2f} GiB but {max(available, 0) / GIB:.2f} GiB "
            "are free on this GPU after the training step's reserve",
            _fit_fix(mode, pbytes, vectors, split),
        )
    return mem


def check_placement(mode: str, param_bytes: int, vectors: str, batch_split: int, grad_fn: Any) -> None:
    """Refuse ``online.vectors`` / ``online.batch_split`` where the operator would (``curvature/hostvectors.py``);
    ``vectors="auto"`` is resolved by :func:`preflight` (``MeasurementMemory.vectors``)."""
    if vectors == "host" and (mode != "fd" or param_bytes >= 4):
        raise MeasurementRefused(
            "online.vectors",
            vectors,
            f"host vectors serve the float32 fd evaluation of bf16/fp16 models (hvp={mode!r}, "
            f"{param_bytes}-byte parameters)",
            "use online.vectors='device' (float32 models keep ~3 x parameter bytes on the device), or hvp='fd'",
        )
    if batch_split > 1 and grad_fn is not None:
        raise MeasurementRefused(
            "online.batch_split",
            batch_split,
            "a grad_fn (megatron's schedule) evaluates its own batch, which the measurement cannot split",
            "use online.batch_split=1, or a smaller held batch",
        )


def _fit_fix(mode: str, param_bytes: int, vectors: str, batch_split: int) -> str:
    more = "fewer parameters per GPU (more TP/PP), or online.enabled=false"
    if mode == "exact":
        return f"use hvp='fd' (no graph), online.batch_split > {batch_split} (the graph of a part), {more}"
    if param_bytes < 4 and vectors == "device":
        return (
            "use online.vectors='host' (Lanczos vectors, products and base gradient in host memory) and "
            f"online.batch_split=2 or more (the float32 forward of a part of the held batch), {more}"
        )
    if param_bytes < 4:
        return f"use online.batch_split > {batch_split} (the float32 forward of a smaller part), {more}"
    return f"use {more}"
