"""Gradients through megatron-core's own pipeline schedule, for finite-difference Hessian products.

Megatron's schedules (``get_forward_backward_func``: no pipelining, 1F1B, interleaved) cannot build a
graph for double backward, but finite differences only need gradients, and computing those with the
user's schedule means the curvature pass runs through exactly the code path training runs through.

    grad_fn = schedule_grad_fn(model, stage_loss_fn, microbatches, seq_length=S, micro_batch_size=B)
    op = HessianOperator(model, stage_loss_fn, microbatches, mode="fd", parallel=ctx, grad_fn=grad_fn)

Under megatron's ``DistributedDataParallel`` wrapper the backward hooks move each gradient into the
parameter's ``main_grad`` (a view of the contiguous grad buffer) and leave ``p.grad`` empty, so the
gradient is read from ``main_grad`` there. The wrapper's own data-parallel reduction (and the model
config's ``finalize_model_grads_func`` / ``grad_sync_func`` / ``no_sync_func``) is held off during the
curvature pass (``no_sync``), because the operator reduces over data-parallel ranks itself; the grad
buffer is zeroed before and after (megatron zeroes it at the start of every iteration anyway).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch


def schedule_grad_fn(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    microbatches: Sequence[Any],
    seq_length: int,
    micro_batch_size: int,
    params: Sequence[torch.Tensor] | None = None,
) -> Callable[[], tuple[float, list[torch.Tensor]]]:
    """A ``grad_fn`` for :class:`~lrscale_megatron.curvature.HessianOperator` (``mode="fd"``).

    ``loss_fn(model, batch)`` returns the stage output (scalar loss on the last stage): the same
    function the operator uses. Returns this rank's local gradients (mean over micro-batches); the
    operator sums tied-embedding halves and averages over data-parallel ranks.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    plist = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    n = len(microbatches)

    def loss_func(out: torch.Tensor):
        return out, {"loss": out.detach().clone()}  # megatron scales `out` in place afterwards

    def forward_step(data_iterator, m):
        batch = next(data_iterator)
        return loss_fn(m, batch), loss_func

    ddp = hasattr(model, "no_sync") and hasattr(model, "zero_grad_buffer")  # megatron DDP
    config = getattr(model, "config", None)
    hooks = ("finalize_model_grads_func", "grad_sync_func", "no_sync_func")

    def _clear() -> None:
        for p in plist:
            p.grad = None
        if ddp:
            model.zero_grad_buffer()  # type: ignore[operator]

    def grad_fn() -> tuple[float, list[torch.Tensor]]:
        fb = get_forward_backward_func()
        saved = {h: getattr(config, h) for h in hooks if config is not None and hasattr(config, h)}
        cpu: contextlib.AbstractContextManager = contextlib.nullcontext()
        if not torch.cuda.is_available():
            from lrscale_megatron.integrations.megatron_cpu import CudaToCpuMode

            cpu = CudaToCpuMode()
        no_sync = model.no_sync() if ddp else contextlib.nullcontext()  # type: ignore[operator]
        try:
            for h in saved:
                setattr(config, h, None)
            _clear()
            with cpu, no_sync:
                losses = fb(
                    forward_step_func=forward_step,
                    data_iterator=iter(list(microbatches)),
                    model=[model],
                    num_microbatches=n,
                    seq_length=seq_length,
                    micro_batch_size=micro_batch_size,
                    forward_only=False,
                )
            # megatron scales each micro-batch loss by 1/num_microbatches before backward
            grads = [_grad_of(p) for p in plist]
        finally:
            for h, f in saved.items():
                setattr(config, h, f)
            _clear()
        loss = float(sum(float(d["loss"]) for d in losses) / n) if losses else float("nan")
        return loss, grads

    return grad_fn


def _grad_of(p: torch.Tensor) -> torch.Tensor:
    """``main_grad`` under megatron DDP (where ``p.grad`` stays empty; fp32 for bf16 params), else
    ``p.grad``; a copy."""
    main = getattr(p, "main_grad", None)
    g = main if main is not None else p.grad
    return g.detach().clone() if g is not None else torch.zeros_like(p)
