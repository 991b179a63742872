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

Memory (:func:`measurement_memory`, bytes on one GPU, over this rank's parameter shards ``N``), counted
on the code as it runs (``tests/unit/test_preflight.py::test_fd_estimate_matches_a_counted_measurement``
holds the estimate to a counted ``k=1`` fd measurement): with finite differences (the online default)
the measurement holds, over one training forward+backward, :data:`FD_VECTORS` = 4 vectors in the vector
dtype (fp32; fp64 for fp64 models): Lanczos' ``q``, ``q_prev`` and the Ritz vector of its second pass
(independent of ``max_iter``) and the cached base gradient. When the host can hold the Lanczos basis
(``lanczos(basis="auto")`` decides at measurement time, ``curvature/hostbasis.py``), the device holds
:data:`FD_HOST_VECTORS` = 2 (``q`` and the base gradient) and the host ``max_iter`` vectors
(``measurement_memory(basis="host", max_iter=...)``), plus, for float32/float64 parameters, the fd
anchor (:data:`FD_ANCHOR_VECTORS` = 1 in the parameter dtype: one copy of the parameters for the length
of the solve, which the products restore from; ``curvature/anchor.py``): 3 in all. The refusal below
uses the fallback's 4, since the host's room is only known when the measurement runs. With the second
pass the perturbed parameters are restored by subtraction, without a copy (the default
``fd_restore="auto"``; ``"copy"``: one more vector in the parameter dtype). With the
Adam preconditioner: :data:`PRECONDITION_VECTORS` = 2 more (the scale and the scaled input). With
bf16/fp16 parameters the loss is evaluated at fp32 substitutes: one more fp32 vector, and the forward
runs in fp32, so one more micro-batch of activations (``activation_bytes``). Exact products keep
:data:`EXACT_FP32_VECTORS` fp32 vectors (Lanczos' three and the product), the tangent in the parameter
dtype and the gradient kept with its graph, and the graph itself (about twice one micro-batch's
activations). The product's own gradient takes the place of the training step's gradient, and its
forward/backward fits in the memory the training step's activations free, so neither is counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

GIB = 1024**3
#: fd, k=1: q, q_prev, the Ritz vector (second pass), the cached base gradient (module docstring)
FD_VECTORS = 4
#: fd, k=1 with the Lanczos basis in host memory: q and the cached base gradient on the device
FD_HOST_VECTORS = 2
#: fd, k=1 with the host basis, float32/float64 parameters: the anchor (in the parameter dtype)
FD_ANCHOR_VECTORS = 1
#: the Adam preconditioner's scale P^-1/2 and the scaled input of each product
PRECONDITION_VECTORS = 2
#: exact products: q, q_prev, the Ritz vector and the product
EXACT_FP32_VECTORS = 4
FREE_MEMORY_MARGIN = 0.9  # refuse when the measurement needs more than this share of free memory


class MeasurementRefused(ValueError):
    """An online measurement that cannot be made in this setting: names the setting, why, and the fix."""

    def __init__(self, setting: str, value: Any, problem: str, fix: str) -> None:
        self.setting, self.value, self.problem, self.fix = setting, value, problem, fix
        super().__init__(f"online curvature: {setting}={value!r}: {problem}. Fix: {fix}")


@dataclass(frozen=True)
class MeasurementMemory:
    """Extra device memory of one online measurement on this rank (bytes)."""

    mode: str
    n_params: int
    param_bytes: int
    vectors_bytes: int
    graph_bytes: int
    precondition: bool
    host_bytes: int = 0  # host memory of a host Lanczos basis (basis="host"), not on the device

    @property
    def total_bytes(self) -> int:
        return self.vectors_bytes + self.graph_bytes

    @property
    def bytes_per_param(self) -> float:
        return self.total_bytes / max(self.n_params, 1)

    def render(self) -> str:
        unit, scale = ("GiB", GIB) if self.total_bytes >= GIB else ("MiB", 1024**2)
        what = "graph" if self.mode == "exact" else "fp32 forward"
        graph = f" + {what} {self.graph_bytes / scale:.2f}" if self.graph_bytes else ""
        host = f"; host basis {self.host_bytes / GIB:.2f} GiB of host memory" if self.host_bytes else ""
        return (
            f"measurement extra {self.total_bytes / scale:.2f} {unit} = vectors {self.vectors_bytes / scale:.2f}"
            f"{graph} (hvp={self.mode}, k=1, any max_iter, {self.bytes_per_param:.1f} B/param, "
            f"{self.total_bytes / max(self.n_params * self.param_bytes, 1):.1f} x parameter bytes{host})"
        )


def measurement_memory(
    n_params: int,
    *,
    mode: str,
    param_bytes: int,
    precondition: bool = True,
    activation_bytes: int = 0,
    fd_restore: str = "auto",
    basis: str = "recompute",
    max_iter: int = 20,
) -> MeasurementMemory:
    """Extra bytes of one ``k=1`` measurement over ``n_params`` local parameter elements (module docstring).

    ``activation_bytes``: one micro-batch's activations (the exact mode's graph; the fp32 forward of
    bf16/fp16 models in fd mode). ``basis``: ``"recompute"`` (no stored basis: the worst case on the
    device) or ``"host"`` (fd only: the basis in host memory, ``max_iter`` vectors in ``host_bytes``).
    ``fd_restore`` as :class:`~lrscale_megatron.curvature.operators.HessianOperator`'s (``"auto"``: the
    anchor with the host basis, subtraction with the second pass).
    """
    if basis not in ("recompute", "host"):
        raise ValueError(f"basis={basis!r} is not 'recompute' or 'host'")
    if basis == "host" and mode != "fd":
        raise ValueError("basis='host' is counted for mode='fd' only")
    if mode not in ("fd", "exact"):
        raise ValueError(f"mode={mode!r} is not 'fd' or 'exact'")
    if fd_restore not in ("auto", "subtract", "copy"):
        raise ValueError(f"fd_restore={fd_restore!r} is not 'auto', 'subtract' or 'copy'")
    low = param_bytes < 4
    vbytes = 8 if param_bytes == 8 else 4  # the vector dtype: fp32, fp64 for fp64 models
    pre = PRECONDITION_VECTORS if precondition else 0
    host = 0
    if mode == "fd":
        per = vbytes * ((FD_HOST_VECTORS if basis == "host" else FD_VECTORS) + pre)
        host = vbytes * int(n_params) * int(max_iter) if basis == "host" else 0
        if low:
            per += 4  # fp32 substitutes of the parameters
        elif fd_restore == "copy":
            per += param_bytes
        elif fd_restore == "auto" and basis == "host":
            per += FD_ANCHOR_VECTORS * param_bytes
        graph = int(activation_bytes) if low else 0  # the fp32 forward of a bf16/fp16 model
    else:
        per = vbytes * (EXACT_FP32_VECTORS + pre) + 2 * param_bytes  # + tangent, gradient with its graph
        graph = 2 * int(activation_bytes)
    vectors = n_params * per
    return MeasurementMemory(mode, int(n_params), int(param_bytes), int(vectors), graph, precondition, host)


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
    checked unless ``free_bytes`` is given; the estimate is still returned. ``parallel`` and ``batch`` are
    accepted for the scheduler's call signature.
    """
    del parallel, batch
    mode = online_cfg.hvp
    check_layout(model, mode, engine=engine, grad_fn=grad_fn)
    opt = optimizer if optimizer is not None else getattr(engine, "optimizer", None)
    check_optimizer(opt, bool(online_cfg.precondition))
    n, pbytes = _local_numel_and_bytes(model)
    mem = measurement_memory(
        n,
        mode=mode,
        param_bytes=pbytes,
        precondition=bool(online_cfg.precondition),
        activation_bytes=activation_bytes,
    )
    first = next((p for p in _unwrap(model).parameters()), None)
    if free_bytes is None and first is not None and first.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(first.device)
        free_bytes = (
            free + torch.cuda.memory_reserved(first.device) - torch.cuda.memory_allocated(first.device)
        )
    if free_bytes is not None:
        available = FREE_MEMORY_MARGIN * free_bytes - reserve_bytes
        if mem.total_bytes > available:
            raise MeasurementRefused(
                "online.hvp",
                mode,
                f"the measurement needs {mem.total_bytes / GIB:.2f} GiB but {max(available, 0) / GIB:.2f} GiB "
                "are free on this GPU after the training step's reserve",
                "use hvp='fd' (no graph), fewer parameters per GPU (more TP/PP), or online.enabled=false",
            )
    return mem
