"""Opt-in, reversible patch that makes megatron-core's tensor-parallel autograd twice differentiable.

Why: megatron-core's TP ``autograd.Function``s (``mappings.py``) do their backward communication with raw
``torch.distributed`` calls that autograd cannot differentiate, and its vocab-parallel cross entropy
saves a softmax computed under ``no_grad``. Double backward (a Hessian-vector product) through them is
**silently wrong**: at TP=1, v·Hv = -139.19 against a finite-difference -36.42, and at TP=2 different
values on different ranks (``shared/probes/FINDINGS.md``). No error is raised.

What the patch swaps (each original kept, restored by :func:`disable`):

* ``_CopyToModelParallelRegion.backward`` calls ``_ReduceFromModelParallelRegion.apply`` and vice versa,
  ``_ScatterToModelParallelRegion.backward`` calls ``_GatherFromModelParallelRegion.apply`` and vice
  versa, so every derivative order is itself an autograd Function with the right communication
  (Copy and Reduce, Scatter and Gather are adjoint pairs);
* ``_ReduceFromModelParallelRegion.forward`` reduces a copy (the original reduces its input in place,
  which corrupts a tensor the first backward still needs);
* ``layers.linear_with_grad_accumulation_and_async_allreduce`` becomes ``Copy.apply`` + ``matmul``
  (differentiable any number of times; no gradient-accumulation fusion, no async all-reduce);
* ``tensor_parallel.vocab_parallel_cross_entropy`` becomes a composition of differentiable ops.

Not covered: sequence parallelism (refused with a clear error) and label smoothing in the patched
cross entropy. The patched path gives the same first-order gradients as the original, so training may
run with the patch enabled, but :class:`~lrscale_megatron.curvature.HessianOperator` only enables it
around its own products (:func:`twice_differentiable_tp`).

Supported host versions: megatron-core 0.16.x (checked; other versions raise with the fix).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

logger = logging.getLogger(__name__)

SUPPORTED_MEGATRON_CORE = ((0, 16),)
_originals: dict[tuple[Any, str], Any] = {}
_logged = False


def _check_version() -> None:
    import megatron.core

    ver = getattr(megatron.core, "__version__", "0.0.0")
    major_minor = tuple(int(x) for x in ver.split(".")[:2])
    if major_minor not in SUPPORTED_MEGATRON_CORE:
        raise RuntimeError(
            f"lrscale's twice-differentiable TP patch supports megatron-core "
            f"{', '.join(f'{a}.{b}.x' for a, b in SUPPORTED_MEGATRON_CORE)}, found {ver}: install "
            "megatron-core==0.16.* or use HessianOperator(mode='fd') (finite differences need no patch)"
        )


def is_enabled() -> bool:
    return bool(_originals)


def _swap(owner: Any, name: str, new: Any) -> None:
    _originals[(owner, name)] = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    setattr(owner, name, new)


def enable() -> None:
    """Apply the patch (idempotent)."""
    global _logged
    if _originals:
        return
    _check_version()
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel as tpp
    from megatron.core.tensor_parallel import layers as L
    from megatron.core.tensor_parallel import mappings as M

    Copy, Reduce = M._CopyToModelParallelRegion, M._ReduceFromModelParallelRegion
    Scatter, Gather = M._ScatterToModelParallelRegion, M._GatherFromModelParallelRegion

    def copy_backward(ctx, g):
        return Reduce.apply(g, ctx.group), None

    def reduce_forward(ctx, x, group):
        ctx.group = group
        return M._reduce(x.clone(), group)

    def reduce_backward(ctx, g):
        return Copy.apply(g, ctx.group), None

    def scatter_backward(ctx, g):
        return Gather.apply(g, ctx.group), None

    def gather_backward(ctx, g):
        return Scatter.apply(g, ctx.group), None

    def linear(
        input,
        weight,
        bias,
        gradient_accumulation_fusion,
        allreduce_dgrad,
        sequence_parallel,
        grad_output_buffer=None,
        wgrad_deferral_limit=0,
        async_grad_allreduce=None,
        tp_group=None,
    ):
        if sequence_parallel:
            raise NotImplementedError(
                "sequence_parallel=True is not supported by lrscale's twice-differentiable TP patch; "
                "set TransformerConfig.sequence_parallel=False for curvature runs or use mode='fd'"
            )
        if allreduce_dgrad:
            group = tp_group if tp_group is not None else ps.get_tensor_model_parallel_group()
            input = Copy.apply(input, group)
        out = torch.matmul(input, weight.t())
        return out + bias if bias is not None else out

    def vocab_parallel_cross_entropy(vocab_parallel_logits, target, label_smoothing=0.0):
        if label_smoothing != 0.0:
            raise NotImplementedError(
                f"label_smoothing={label_smoothing} is not supported by lrscale's differentiable "
                "vocab-parallel cross entropy; use 0.0 for curvature runs"
            )
        group = ps.get_tensor_model_parallel_group()
        world = dist.get_world_size(group) if dist.is_initialized() else 1
        rank = dist.get_rank(group) if world > 1 else 0
        logits = vocab_parallel_logits
        m = logits.detach().max(dim=-1, keepdim=True)[0]
        if world > 1:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        z = logits - m
        sumexp = Reduce.apply(z.exp().sum(-1), group)
        vp = logits.size(-1)
        start = rank * vp
        in_range = (target >= start) & (target < start + vp)
        local_t = (target - start).clamp(0, vp - 1)
        picked = z.gather(-1, local_t.unsqueeze(-1)).squeeze(-1) * in_range
        picked = Reduce.apply(picked, group)
        return sumexp.log() - picked

    _swap(Copy, "backward", staticmethod(copy_backward))
    _swap(Reduce, "forward", staticmethod(reduce_forward))
    _swap(Reduce, "backward", staticmethod(reduce_backward))
    _swap(Scatter, "backward", staticmethod(scatter_backward))
    _swap(Gather, "backward", staticmethod(gather_backward))
    _swap(L, "linear_with_grad_accumulation_and_async_allreduce", linear)
    _swap(tpp, "vocab_parallel_cross_entropy", vocab_parallel_cross_entropy)
    if not _logged:
        logger.info("enabled twice-differentiable megatron-core TP autograd (7 symbols swapped)")
        _logged = True


def disable() -> None:
    """Restore every swapped symbol (idempotent)."""
    while _originals:
        (owner, name), orig = _originals.popitem()
        setattr(owner, name, orig)


@contextlib.contextmanager
def twice_differentiable_tp() -> Iterator[None]:
    """Enable the patch for the duration of the block, restoring the previous state afterwards."""
    was = is_enabled()
    enable()
    try:
        yield
    finally:
        if not was:
            disable()


def model_has_megatron_tp_layers(model: torch.nn.Module) -> bool:
    """True when ``model`` contains megatron-core tensor-parallel layers or its TP cross entropy path."""
    try:
        from megatron.core.tensor_parallel import layers as L
    except ImportError:
        return False
    kinds = (L.ColumnParallelLinear, L.RowParallelLinear, L.VocabParallelEmbedding)
    return any(isinstance(m, kinds) for m in model.modules())
