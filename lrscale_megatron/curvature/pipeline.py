"""Exact Hessian-vector products and gradients across pipeline stages.

Megatron's pipeline schedules cannot build a graph for double backward, so the exact product is
computed stage by stage with explicit point-to-point messages (reverse-over-reverse, Pearlmutter 1994,
split at the stage boundaries). For a stage ``s`` with input activation ``a`` (from stage ``s-1``),
output ``o`` and parameters ``θ_s``:

1. forward: ``o = f_s(θ_s, a)`` (the last stage returns the scalar loss);
2. first backward (``create_graph``): the last stage differentiates the loss; every other stage
   receives ``γ = ∂L/∂o`` as a *leaf* and differentiates ``⟨o, γ⟩``. This gives ``g_s`` (its gradient)
   and ``∂L/∂a``, which goes back to stage ``s-1``;
3. forward tangent sweep: stage ``s`` receives ``u`` (the tangent of ``a`` along ``v``) and forms
   ``σ_s = ⟨g_s, v_s⟩ + ⟨∂L/∂a, u⟩``; ``∂σ_s/∂γ`` is the tangent of ``o``, sent to stage ``s+1``;
4. backward adjoint sweep: stage ``s`` receives ``w = dΣσ/do`` from stage ``s+1`` and computes
   ``(Hv)_s = ∂(σ_s + ⟨o, w⟩)/∂θ_s`` and ``w_prev = ∂(σ_s + ⟨o, w⟩)/∂a``, sent to stage ``s-1``.

Messages per micro-batch: two activation-sized tensors each way per stage boundary beyond the first
order pass. Micro-batches are processed one after another (no 1F1B interleaving: the curvature pass is
rare and memory, not bubble time, is what matters). The stage function is ``stage_fn(batch, input)``:
it must consume ``input`` (``None`` on the first stage) and return the stage output (a scalar loss on
the last stage).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from lrscale_megatron.curvature.autodiff import refuse_untracked_backward, second_backward
from lrscale_megatron.curvature.doublegrad import cheap_double_backward

if TYPE_CHECKING:
    from lrscale_megatron.parallel import ParallelContext

StageFn = Callable[[Any, "torch.Tensor | None"], torch.Tensor]


def _grads(outputs, inputs, grad_outputs=None, create_graph=False, retain_graph=None):
    """Gradients, zeros for inputs the outputs do not depend on at all (``None``: e.g. a parameter
    unused on this stage). Paths autograd cannot differentiate twice are refused by the callers'
    :func:`refuse_untracked_backward` guard before any second backward, so a zero here is a true zero."""
    if create_graph:
        with refuse_untracked_backward([outputs] if isinstance(outputs, torch.Tensor) else list(outputs)):
            gs = torch.autograd.grad(
                outputs, inputs, grad_outputs=grad_outputs, create_graph=True, allow_unused=True
            )
    elif retain_graph is None and grad_outputs is None:
        gs = second_backward(outputs, inputs, None, retain_graph=False)
    else:
        gs = torch.autograd.grad(
            outputs, inputs, grad_outputs=grad_outputs, retain_graph=retain_graph, allow_unused=True
        )
    return [torch.zeros_like(x) if g is None else g for g, x in zip(gs, inputs)]


def _inner(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> torch.Tensor:
    total = None
    for x, y in zip(xs, ys):
        t = (x * y.to(x.dtype)).sum()
        total = t if total is None else total + t
    assert total is not None
    return total


def pipeline_loss_and_grad(
    ctx: ParallelContext, stage_fn: StageFn, batch: Any, params: list[torch.Tensor]
) -> tuple[float, list[torch.Tensor]]:
    """First-order pass through all stages for one micro-batch: (loss on the last stage, this stage's grads)."""
    a = None
    if not ctx.is_first_stage:
        a = ctx.recv_prev().requires_grad_(True)
    o = stage_fn(batch, a)
    if not ctx.is_last_stage:
        ctx.send_next(o)
        gamma = ctx.recv_next().to(o.dtype)
        target = _inner([o], [gamma])
        loss = float("nan")
    else:
        target = o
        loss = float(o.detach())
    inputs = params + ([a] if a is not None else [])
    gs = _grads(target, inputs)
    if a is not None:
        ctx.send_prev(gs[-1])
    return loss, [g.detach() for g in gs[: len(params)]]


def pipeline_hvp(
    ctx: ParallelContext, stage_fn: StageFn, batch: Any, params: list[torch.Tensor], v: Sequence[torch.Tensor]
) -> tuple[float, list[torch.Tensor]]:
    """Exact (H v) restricted to this stage's ``params`` for one micro-batch; see the module docstring."""
    # 1. forward (GELU / LayerNorm / softmax with the cheaper double backward of :mod:`.doublegrad`: the
    # same loss and first gradient; the graph is differentiated once with create_graph, as they require)
    a = None
    if not ctx.is_first_stage:
        a = ctx.recv_prev().requires_grad_(True)
    with cheap_double_backward():
        o = stage_fn(batch, a)
    gamma = None
    if not ctx.is_last_stage:
        ctx.send_next(o)
    # 2. first backward with graph
    if ctx.is_last_stage:
        target = o
        loss = float(o.detach())
    else:
        gamma = ctx.recv_next().to(o.dtype).requires_grad_(True)
        target = _inner([o], [gamma])
        loss = float("nan")
    inputs = params + ([a] if a is not None else [])
    gs = _grads(target, inputs, create_graph=True)
    g = gs[: len(params)]
    sigma = _inner(g, v)
    if a is not None:
        ga = gs[-1]
        ctx.send_prev(ga.detach())
        # 3. forward tangent sweep
        u = ctx.recv_prev().to(ga.dtype)
        sigma = sigma + _inner([ga], [u])
    if gamma is not None:
        (tangent_o,) = _grads(sigma, [gamma], retain_graph=True)
        ctx.send_next(tangent_o)
    # 4. backward adjoint sweep
    total = sigma
    if not ctx.is_last_stage:
        w = ctx.recv_next().to(o.dtype)
        total = total + _inner([o], [w])
    out = _grads(total, inputs)
    if a is not None:
        ctx.send_prev(out[-1])
    return loss, [h.detach() for h in out[: len(params)]]
