"""Evaluate a measurement's batch in smaller micro-batches (``HessianOperator(batch_split=n)``).

A product's forward/backward holds one micro-batch's activations; a float32 evaluation of a bf16 model
(:mod:`.hostvectors`) holds twice the bf16 training step's. Splitting each micro-batch into ``n`` equal
parts along dim 0 divides the activations by ``n``; the loss is then the mean of the parts' losses, which
is the batch's loss when ``loss_fn`` is a mean over equally many samples/tokens per sequence (as gradient
accumulation over equal micro-batches computes it), so the Hessian is the same one; products cost about
the same (the same tokens, in ``n`` smaller passes).

Every tensor of the batch whose leading size is the batch size (the leading size of the first tensor
with a dimension, in ``torch.utils._pytree`` order) is split along dim 0; other leaves (scalars, a shared
attention mask of another leading size, non-tensors) go unchanged to every part. A batch that cannot be
split so is refused with the reason and the fix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten


def split_batch(batch: Any, n: int) -> list[Any]:
    """``batch`` as ``n`` micro-batches of equal size along dim 0 (module docstring)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"batch_split={n!r} must be an integer >= 1 (parts per micro-batch)")
    if n == 1:
        return [batch]
    leaves, spec = tree_flatten(batch)
    sized = [t for t in leaves if isinstance(t, torch.Tensor) and t.dim() >= 1]
    if not sized:
        raise ValueError(
            f"batch_split={n}: the batch has no tensor with a batch dimension to split; pass batch_split=1 "
            "or a list of micro-batches"
        )
    b = int(sized[0].shape[0])
    if b % n != 0:
        raise ValueError(
            f"batch_split={n} does not divide the batch size {b} (dim 0 of the batch's first tensor) into "
            f"equal parts (unequal parts would weigh samples unequally in the mean loss); use a divisor of {b}"
        )
    parts: list[list[Any]] = [[] for _ in range(n)]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.dim() >= 1 and leaf.shape[0] == b:
            for part, chunk in zip(parts, leaf.chunk(n, dim=0)):
                part.append(chunk)
        else:
            for part in parts:
                part.append(leaf)
    return [tree_unflatten(p, spec) for p in parts]


def microbatches(batch: Any, n: int) -> list[Any]:
    """The operator's micro-batches: ``batch`` (or each micro-batch of a ``list`` of them) in ``n`` parts."""
    given = batch if isinstance(batch, list) and batch and not isinstance(batch[0], (int, float)) else [batch]
    return [part for mb in given for part in split_batch(mb, n)]


def accumulated_grads(
    op: Any,
    leaves: list[torch.Tensor] | None,
    grad_scale: float,
    accumulate: Callable[[Any, list[torch.Tensor | None], int], Any],
) -> tuple[float, Any]:
    """The mean loss over ``op.microbatches`` and ``accumulate(acc, g, n)`` folded over their gradients
    with respect to ``leaves`` (``None``: the parameters; one pipeline schedule per micro-batch under pipeline parallelism), inside the
    operator's evaluation context; ``grad_scale`` seeds the backward (ignored by a pipeline schedule).
    Shared by the operator's device gradient and :func:`~.hostvectors.host_gradient` (host accumulation)."""
    n, total, acc = len(op.microbatches), 0.0, None
    wrt = op.params if leaves is None else leaves
    with op._evaluation(leaves):
        for mb in op.microbatches:
            if op.parallel.pp_size > 1:
                from lrscale_megatron.curvature.pipeline import pipeline_loss_and_grad

                loss, gl = pipeline_loss_and_grad(op.parallel, op._stage_fn, mb, wrt)
                g: list[torch.Tensor | None] = list(gl)
                del gl  # the accumulation frees each tensor of ``g`` (host vectors)
            else:
                out = op._stage_fn(mb, None)
                loss = float(out.detach())
                seed = None if grad_scale == 1.0 else torch.full_like(out, grad_scale)
                g = list(torch.autograd.grad(out, wrt, grad_outputs=seed, allow_unused=True))
                del out
            total += loss / n
            acc = accumulate(acc, g, n)
            del g
    return total, acc
