"""The linear layer's double backward in one node, for :mod:`.doublegrad` (exact products only).

PyTorch's first backward of ``F.linear`` (``addmm`` on the flattened input) is three nodes: ``dx = dy W``
and ``dW = dy^T x`` (two ``mm``) and ``db = sum(dy)``. Differentiated again, each sends its own cotangent
to ``dy``, which the autograd engine then sums with two full-size additions, through transposes and views.
:class:`_LinearGrad` returns the same three gradients from **the same kernels** (the first gradient is bit
for bit PyTorch's) and its backward writes ``d dy = a W^T + x cW^T + cb`` with one ``addmm`` and one
``addmm_``: the same four matmuls as PyTorch's reverse-over-reverse, no additions for ``dy``.

Routed only where PyTorch itself runs ``addmm`` on the flattened input (a bias, and a 2-d or contiguous
input), so that the loss and the first gradient stay bit for bit the same; anything else goes to PyTorch.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        return torch._C._nn.linear(x, w, b)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _LinearGrad.apply(dy, x, w)
        return _grads(dy, x, w, ctx.needs_input_grad)


def _as(t: torch.Tensor, shape) -> torch.Tensor:
    """``t.view(shape)`` for a fresh contiguous ``t``, not recorded as a view: the autograd engine sums a
    gradient into a buffer in place only when nothing else holds its storage (a view holds its base)."""
    return torch.ops.aten._unsafe_view(t, shape)


def _grads(dy, x, w, need):
    # the kernels of AddmmBackward0 (mm_mat1_backward / mm_mat2_backward for a transposed weight) and of
    # the bias's ExpandBackward0 (sum_to), in the layout at::linear gives them
    dy2 = dy.reshape(-1, dy.shape[-1])
    dx = _as(dy2.mm(w), x.shape) if need[0] else None
    dw = dy2.t().mm(x.reshape(-1, x.shape[-1])) if need[1] else None
    db = _as(dy2.sum([0], keepdim=True), dy.shape[-1:]) if need[2] else None
    return dx, dw, db


class _LinearGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dy, x, w):
        ctx.save_for_backward(dy, x, w)
        ctx.set_materialize_grads(False)
        return _grads(dy, x, w, (True, True, True))

    @staticmethod
    @once_differentiable
    def backward(ctx, a, cw, cb):
        dy, x, w = ctx.saved_tensors
        need_dy, need_x, need_w = ctx.needs_input_grad
        dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        a2 = None if a is None else a.reshape(-1, a.shape[-1])
        ddy = dx = dw = None
        if need_dy:
            # d dy = a W^T + x cW^T + cb
            # (a is None where dx is not used: an input that does not require grad, e.g. the first layer's)
            if a2 is not None:
                ddy = a2.mm(w.t()) if cb is None else torch.addmm(cb, a2, w.t())
            if cw is not None:
                if ddy is None:
                    ddy = x2.mm(cw.t()) if cb is None else torch.addmm(cb, x2, cw.t())
                else:
                    ddy.addmm_(x2, cw.t())
            if ddy is None and cb is not None:
                ddy = cb.expand(dy2.shape).clone()
            if ddy is not None:
                ddy = _as(ddy, dy.shape)
        if need_x and cw is not None:
            dx = _as(dy2.mm(cw), x.shape)  # d/dx <cW, dy^T x>
        if need_w and a2 is not None:
            dw = dy2.t().mm(a2)  # d/dW <a, dy W>
        return ddy, dx, dw
