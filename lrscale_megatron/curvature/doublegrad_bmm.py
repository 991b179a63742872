"""A batched matmul's double backward in one node, for :mod:`.doublegrad` (exact products only).

``q @ k.transpose(-2, -1)`` and ``att @ v`` in an attention core are ``torch.matmul`` of two tensors with
the same batch dims, which ATen runs as ``bmm`` on the inputs reshaped to 3-d. PyTorch's first backward
is ``BmmBackward0`` (``da = dy b^T``, ``db = a^T dy``, through transposes of the saved inputs);
differentiated again, each sends its own cotangent to ``dy``, which the autograd engine sums with a
full-size addition. :class:`_BmmGrad` returns the same two gradients from **the same kernel calls** (the
first gradient is bit for bit PyTorch's) and its backward writes ``d dy = ca b + a cb`` with one ``bmm``
and one ``baddbmm_``: the same four ``bmm`` as PyTorch's reverse-over-reverse, no addition for ``dy``.

Routed only for plain float tensors of the same number (>= 3) of dims and the same batch shape (no
broadcasting), where ``torch.matmul`` itself reshapes both to 3-d and calls ``bmm``; the reshapes stay
PyTorch's own (recorded as usual). Anything else goes to PyTorch.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from lrscale_megatron.curvature.doublegrad_linear import _as


class _Bmm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a.bmm(b)

    @staticmethod
    def backward(ctx, dy):
        a, b = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _BmmGrad.apply(dy, a, b)
        return _grads(dy, a, b, ctx.needs_input_grad)


def _grads(dy, a, b, need):
    # BmmBackward0's formulas: self: grad.bmm(mat2.transpose(1, 2)), mat2: self.transpose(1, 2).bmm(grad)
    da = dy.bmm(b.transpose(1, 2)) if need[0] else None
    db = a.transpose(1, 2).bmm(dy) if need[1] else None
    return da, db


class _BmmGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dy, a, b):
        ctx.save_for_backward(dy, a, b)
        ctx.set_materialize_grads(False)
        return _grads(dy, a, b, (True, True))

    @staticmethod
    @once_differentiable
    def backward(ctx, ca, cb):
        dy, a, b = ctx.saved_tensors
        need_dy, need_a, need_b = ctx.needs_input_grad
        ddy = da = db = None
        if need_dy:  # d dy = ca b + a cb
            if ca is not None:
                ddy = ca.bmm(b)
                if cb is not None:
                    ddy.baddbmm_(a, cb)
            elif cb is not None:
                ddy = a.bmm(cb)
        if need_a and cb is not None:
            da = dy.bmm(cb.transpose(1, 2))  # d/da <cb, a^T dy>
        if need_b and ca is not None:
            db = ca.transpose(1, 2).bmm(dy)  # d/db <ca, dy b^T>
        return ddy, da, db


def matmul(x, y):
    """``torch.matmul(x, y)`` through :class:`_Bmm` where ATen would call ``bmm`` on both reshaped to 3-d
    (same dims >= 3, same batch shape); ``NotImplemented`` otherwise."""
    if x.dim() < 3 or x.dim() != y.dim() or x.shape[:-2] != y.shape[:-2]:
        return NotImplemented
    n, m = x.shape[-2:]
    p = y.shape[-1]
    out = _Bmm.apply(x.reshape(-1, n, m), y.reshape(-1, m, p))
    return _as(out, (*x.shape[:-2], n, p))  # bmm's result is fresh and contiguous, as in at::matmul
